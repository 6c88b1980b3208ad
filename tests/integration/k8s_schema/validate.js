#!/usr/bin/env node
// Validates Kubernetes objects offline, as an API server with strict field
// validation would: node validate.js FILE... (each a JSON object or a List
// of them, as deploy/k8s_job.py prints). Prints one line per invalid
// object and field ("FILE: Job fm-worker: /spec/x: unknown field") and
// exits 1 if any object is invalid, else prints "N objects valid".
//
// - Kubernetes' own kinds: the validators that kubernetes-models generates
//   from the official Kubernetes OpenAPI schemas (types, formats such as
//   quantities, enums, required fields). Those validators let unknown
//   fields pass, so each object is validated through a proxy that records
//   every field the validator looks at: a field it never looked at is not
//   in the schema, and is reported as unknown.
// - JobSet: jobset.v1alpha2.schema.json (the JobSet CRD's schema, its
//   source named there) with ajv; each replicated Job's template.spec with
//   the official batch/v1 JobSpec validator, as the CRD inlines it; and the
//   CRD's rules its schema cannot state.
// - Every object: names, label keys and values, as the API server checks
//   them (DNS labels and subdomains, at most 63 characters).
//
// The node_modules (package.json, package-lock.json) come from
// MX_K8S_SCHEMA_MODULES, default /usr/local/lib/mx-k8s-schema/node_modules
// (deploy/setup.sh installs them there).
"use strict";
const fs = require("fs");
const path = require("path");

const MODULES = process.env.MX_K8S_SCHEMA_MODULES || "/usr/local/lib/mx-k8s-schema/node_modules";
const schemaValidator = (name) =>
  require(path.join(MODULES, "kubernetes-models/_schemas", name + ".js")).validate;
const metaValidator = (name) =>
  require(path.join(MODULES, "@kubernetes-models/apimachinery/_schemas", name + ".js")).validate;

// kind -> [apiVersion, the official schema's validator, name rule].
const KINDS = {
  Job: ["batch/v1", schemaValidator("IoK8sApiBatchV1Job"), "subdomain"],
  Service: ["v1", schemaValidator("IoK8sApiCoreV1Service"), "label"],
  Secret: ["v1", schemaValidator("IoK8sApiCoreV1Secret"), "subdomain"],
  ConfigMap: ["v1", schemaValidator("IoK8sApiCoreV1ConfigMap"), "subdomain"],
  NetworkPolicy: ["networking.k8s.io/v1", schemaValidator("IoK8sApiNetworkingV1NetworkPolicy"),
                  "subdomain"],
};
const validateJobSpec = schemaValidator("IoK8sApiBatchV1JobSpec");
const validateObjectMeta = metaValidator("IoK8sApimachineryPkgApisMetaV1ObjectMeta");

// What a generated validator's error (which has no message) says.
function describe(e) {
  const p = e.params || {};
  switch (e.keyword) {
    case "type": return `must be ${p.type}`;
    case "format": return `must match format "${p.format}"`;
    case "enum": return `must be one of ${JSON.stringify(p.allowedValues)}`;
    case "required": return `missing required field "${p.missingProperty}"`;
    case "oneOf": return "must match exactly one of its forms";
    default: return `fails ${e.keyword} ${JSON.stringify(p)}`;
  }
}

// `validate` (a generated validator) applied to `object` through a proxy;
// returns its errors and the paths of the fields it never read.
function validateTracked(validate, object) {
  const read = new WeakMap();
  const proxies = new WeakMap();
  const wrap = (o) => {
    if (o === null || typeof o !== "object") return o;
    if (!proxies.has(o)) {
      read.set(o, new Set());
      proxies.set(o, new Proxy(o, {
        get(t, k, r) {
          if (typeof k === "string") read.get(t).add(k);
          return wrap(Reflect.get(t, k, r));
        },
        has(t, k) {
          if (typeof k === "string") read.get(t).add(k);
          return Reflect.has(t, k);
        },
      }));
    }
    return proxies.get(o);
  };
  const ok = validate(wrap(object));
  const errors = ok ? [] : [...new Set(validate.errors.map(
    (e) => `${e.instancePath || "/"}: ${e.message || describe(e)}`))];
  const unknown = [];
  (function walk(o, at) {
    if (o === null || typeof o !== "object") return;
    if (Array.isArray(o)) return o.forEach((v, i) => walk(v, `${at}/${i}`));
    const seen = read.get(o) || new Set();
    for (const k of Object.keys(o)) {
      if (seen.has(k)) walk(o[k], `${at}/${k}`);
      else unknown.push(`${at}/${k}: unknown field`);
    }
  })(object, "");
  return errors.concat(unknown);
}

const DNS_LABEL = /^[a-z0-9]([-a-z0-9]*[a-z0-9])?$/;
const DNS_1035_LABEL = /^[a-z]([-a-z0-9]*[a-z0-9])?$/;
const LABEL_NAME = /^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$/;

function checkDnsLabel(name, at, errors, pattern = DNS_LABEL) {
  if (typeof name !== "string" || name.length > 63 || !pattern.test(name)) {
    errors.push(`${at}: "${name}" is no DNS label (lower case letters, digits and '-', at most 63)`);
  }
}

function checkSubdomain(name, at, errors) {
  if (typeof name !== "string" || name.length > 253 ||
      !name.split(".").every((part) => part.length <= 63 && DNS_LABEL.test(part))) {
    errors.push(`${at}: "${name}" is no DNS subdomain`);
  }
}

// Label keys ([prefix/]name) and values, as the API server checks them.
function checkLabels(labels, at, errors) {
  for (const [key, value] of Object.entries(labels || {})) {
    const slash = key.lastIndexOf("/");
    const name = key.slice(slash + 1);
    if (slash >= 0) checkSubdomain(key.slice(0, slash), `${at}/${key}`, errors);
    if (name.length > 63 || !LABEL_NAME.test(name)) errors.push(`${at}/${key}: bad label key`);
    if (typeof value !== "string" || value.length > 63 || (value !== "" && !LABEL_NAME.test(value))) {
      errors.push(`${at}/${key}: bad label value "${value}"`);
    }
  }
}

function checkMetadata(object, nameRule, errors) {
  const meta = object.metadata || {};
  errors.push(...validateTracked(validateObjectMeta, meta).map((e) => `/metadata${e}`));
  if (nameRule === "label") checkDnsLabel(meta.name, "/metadata/name", errors, DNS_1035_LABEL);
  else checkSubdomain(meta.name, "/metadata/name", errors);
  checkLabels(meta.labels, "/metadata/labels", errors);
}

// A Job's pods and their labels (the Job's template).
function checkPodTemplate(spec, at, errors) {
  const template = (spec && spec.template) || {};
  checkLabels((template.metadata || {}).labels, `${at}/template/metadata/labels`, errors);
}

const Ajv = require(path.join(MODULES, "ajv"));
const validateJobSetSchema = new Ajv({ allErrors: true, strict: true })
  .compile(JSON.parse(fs.readFileSync(path.join(__dirname, "jobset.v1alpha2.schema.json"))));

function checkJobSet(js, errors) {
  if (!validateJobSetSchema(js)) {
    for (const e of validateJobSetSchema.errors) {
      const extra = e.keyword === "additionalProperties" ? ` "${e.params.additionalProperty}"` : "";
      errors.push(`${e.instancePath || "/"}: ${e.message}${extra}`);
    }
  }
  checkMetadata(js, "label", errors);
  const spec = js.spec || {};
  const jobs = Array.isArray(spec.replicatedJobs) ? spec.replicatedJobs : [];
  const names = new Set();
  jobs.forEach((rj, i) => {
    const at = `/spec/replicatedJobs/${i}`;
    if (names.has(rj.name)) errors.push(`${at}/name: "${rj.name}" twice (a map keyed by name)`);
    names.add(rj.name);
    checkDnsLabel(rj.name, `${at}/name`, errors, DNS_1035_LABEL);
    const template = rj.template || {};
    errors.push(...validateTracked(validateJobSpec, template.spec || {}).map(
      (e) => `${at}/template/spec${e}`));
    checkLabels((template.metadata || {}).labels, `${at}/template/metadata/labels`, errors);
    checkPodTemplate(template.spec, `${at}/template/spec`, errors);
    // The pods' hostnames, <jobset>-<job>-<job index>-<pod index>, are DNS labels.
    const lastJob = (rj.replicas === undefined ? 1 : rj.replicas) - 1;
    const lastPod = ((template.spec || {}).completions || 1) - 1;
    checkDnsLabel(`${js.metadata && js.metadata.name}-${rj.name}-${lastJob}-${lastPod}`,
                  `${at}: the last pod's hostname`, errors);
    if (rj.dependsOn && spec.startupPolicy && spec.startupPolicy.startupPolicyOrder === "InOrder") {
      errors.push(`${at}/dependsOn: StartupPolicy and DependsOn APIs are mutually exclusive`);
    }
  });
  for (const target of (spec.successPolicy || {}).targetReplicatedJobs || []) {
    if (!names.has(target)) errors.push(`/spec/successPolicy: no replicated Job "${target}"`);
  }
}

function check(object) {
  const errors = [];
  if (object.kind === "JobSet") {
    checkJobSet(object, errors);
    return errors;
  }
  const known = KINDS[object.kind];
  if (known === undefined) return [`/kind: "${object.kind}" is none this validator knows`];
  const [apiVersion, validate, nameRule] = known;
  if (object.apiVersion !== apiVersion) {
    errors.push(`/apiVersion: "${object.apiVersion}", not "${apiVersion}"`);
  }
  errors.push(...validateTracked(validate, object));
  checkMetadata(object, nameRule, errors);
  if (object.kind === "Job") {
    checkPodTemplate(object.spec, "/spec", errors);
    // An Indexed Job's pods are named <job>-<index>-<suffix>; their
    // hostnames, <job>-<index>, are DNS labels.
    if (object.spec && object.spec.completionMode === "Indexed") {
      checkDnsLabel(`${object.metadata.name}-${object.spec.completions - 1}`,
                    "the last pod's hostname", errors);
    }
  }
  return errors;
}

let invalid = 0;
let count = 0;
for (const file of process.argv.slice(2)) {
  let document;
  try {
    document = JSON.parse(fs.readFileSync(file, "utf8"));
  } catch (e) {
    console.log(`${file}: not JSON: ${e.message}`);
    invalid++;
    continue;
  }
  const objects = document.kind === "List" ? document.items || [] : [document];
  for (const object of objects) {
    count++;
    const errors = check(object);
    if (errors.length > 0) invalid++;
    const name = `${object.kind} ${(object.metadata || {}).name}`;
    for (const e of errors) console.log(`${file}: ${name}: ${e}`);
  }
}
console.log(invalid === 0 ? `${count} objects valid` : `${invalid} of ${count} objects invalid`);
process.exit(invalid === 0 ? 0 : 1);
