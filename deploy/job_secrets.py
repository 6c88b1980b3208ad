"""The secrets of one job that deploy/launch.py starts: the job token and,
with --tls, a CA and a certificate per node, made with Debian's openssl.

Everything lives in a private directory (mode 0700, files 0600) that is
removed when the job ends (JobSecrets.remove; launch.py calls it on every
way it ends). Processes get the paths through the environment
(MX_JOB_TOKEN_FILE, MX_TLS_CERT, MX_TLS_KEY, MX_TLS_CA), never the secrets
in their arguments, which `ps` shows to every user.
"""
import os
import secrets
import shutil
import subprocess
import tempfile

# The one name every certificate of a launcher-made CA carries (a DNS
# subjectAltName), which nodes check instead of the address they dial: the
# addresses of a job's nodes need not be known when its certificates are
# made (mx_server --tls_server_name, MX_TLS_SERVER_NAME).
SERVER_NAME = "mx-job"

# How long a CA made here and the certificates it signs are valid, in days:
# longer than any job runs, since every new handshake (a reconnect, a
# spare, a restarted coordinator) checks the dates, and a Kubernetes Secret
# made of them (deploy/k8s_job.py --tls) lives as long as its job. (30
# days, before: a job's 31st day refused every new connection.) 10 years;
# k8s_job.py --tls-days sets another.
DEFAULT_TLS_DAYS = 3650


class JobSecrets:
    def __init__(self, token_file=None, tls=False, tls_files=None, tls_days=DEFAULT_TLS_DAYS):
        """token_file: a file holding the token (else one is generated);
        tls: make a CA and per-node certificates, valid for tls_days days;
        tls_files: (cert, key, ca) paths to use for every node instead."""
        self.tls_days = str(int(tls_days))
        self.dir = tempfile.mkdtemp(prefix="mx-job-")  # mode 0700
        self.tls = tls or tls_files is not None
        self.tls_files = tls_files
        self._ca = None
        try:
            self.token_file = token_file or self._write("token", secrets.token_hex(32) + "\n")
            if tls and tls_files is None:
                self._ca = self._make_ca()
        except BaseException:  # no object to remove() it: not even a CA key stays behind
            self.remove()
            raise

    def _write(self, name, text):
        path = os.path.join(self.dir, name)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(text)
        return path

    def _openssl(self, *args):
        try:
            subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=30)
        except FileNotFoundError:
            raise RuntimeError("--tls needs openssl (apt-get install openssl)")
        except subprocess.CalledProcessError as e:
            raise RuntimeError(f"openssl {args[0]} failed: {e.stderr.decode(errors='replace')}")

    def _make_ca(self):
        key, cert = os.path.join(self.dir, "ca.key"), os.path.join(self.dir, "ca.pem")
        old = os.umask(0o077)
        try:
            self._openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                          "-nodes", "-keyout", key, "-out", cert, "-days", self.tls_days,
                          "-subj", "/CN=mx job CA")
        finally:
            os.umask(old)
        return key, cert

    def issue(self, name):
        """A key and a certificate for node `name` ("server-1"), signed by
        the job's CA, usable as server and as client."""
        ca_key, ca_cert = self._ca
        key = os.path.join(self.dir, f"{name}.key")
        csr = os.path.join(self.dir, f"{name}.csr")
        cert = os.path.join(self.dir, f"{name}.pem")
        ext = self._write(f"{name}.ext",
                          f"subjectAltName=DNS:{SERVER_NAME},DNS:localhost,IP:127.0.0.1,IP:::1\n"
                          "extendedKeyUsage=serverAuth,clientAuth\n")
        old = os.umask(0o077)
        try:
            self._openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                          "-keyout", key, "-out", csr, "-subj", f"/CN={name}")
            self._openssl("x509", "-req", "-in", csr, "-CA", ca_cert, "-CAkey", ca_key,
                          "-CAcreateserial", "-out", cert, "-days", self.tls_days, "-extfile", ext)
        finally:
            os.umask(old)
        return cert, key, ca_cert

    def env(self, name):
        """The environment node `name` ("coordinator", "server-0",
        "worker-1") needs: the token's file and its TLS files."""
        env = {"MX_JOB_TOKEN_FILE": self.token_file}
        if self.tls:
            if self.tls_files is not None:
                cert, key, ca = self.tls_files
            else:
                cert, key, ca = self.issue(name)
                env["MX_TLS_SERVER_NAME"] = SERVER_NAME
            env.update(MX_TLS_CERT=cert, MX_TLS_KEY=key, MX_TLS_CA=ca)
        return env

    def remove(self):
        shutil.rmtree(self.dir, ignore_errors=True)
