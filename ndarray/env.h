// The one reader of mx's settings from environment variables and from
// command-line flags that fall back to them.
//
// Policy, everywhere: an unset or empty variable means "not given"; a value
// that is given but is not what the variable takes is an error naming the
// variable and the value ("MX_RPC_TIMEOUT_S=soon: must be a whole number
// from 1 to 86400"), never silently replaced by a default.
#ifndef MX_NDARRAY_ENV_H_
#define MX_NDARRAY_ENV_H_

#include <cstdint>
#include <optional>
#include <string>

#include "absl/status/statusor.h"

namespace mx {

// For a signal handler that ends the program: writes one line to stderr,
// "PROGRAM: stopping (SIGTERM)SUFFIX" (or SIGINT, or the signal's number),
// and exits with 128 + sig. Async-signal-safe: write and _exit only.
[[noreturn]] void ExitOnStopSignal(const char* program, int sig, const char* suffix = "");

// The value of environment variable `name`; "" when unset.
std::string EnvString(const char* name);

// For a program's main, before absl::ParseCommandLine: when argv asks for
// help (--help, --helpfull, --helpshort, -help), prints the program's
// usage message and every flag it defines (not abseil's own), with its
// default and help, to stdout and exits 0. (Abseil's --help exits 1, which
// scripts and container probes read as a failure.)
void ExitOnHelpFlag(int argc, char** argv);

// A program's flags: ExitOnHelpFlag, then absl::ParseCommandLine (which
// exits 1 naming an unknown flag or a bad value); then any word that is no
// flag is refused the same way, exit code 1: "--elastic false" set
// --elastic and left "false" unread (a boolean takes --flag=false).
void ParseFlags(int argc, char** argv);

// `text` read as a whole number in [min, max]; `what` names where it came
// from in the error ("MX_RANK" or "--rank"): INVALID_ARGUMENT
// "WHAT=TEXT: must be a whole number from MIN to MAX".
absl::StatusOr<int64_t> ParseInt(const std::string& what, const std::string& text, int64_t min,
                                 int64_t max);

// Environment variable `name` as by ParseInt; nullopt when not given.
absl::StatusOr<std::optional<int64_t>> EnvInt(const char* name, int64_t min, int64_t max);

// Environment variable `name` as 0 or 1; nullopt when not given.
absl::StatusOr<std::optional<bool>> EnvBool(const char* name);

// A flag that falls back to an environment variable: `flag_text` (the
// flag's value, "" when not given) wins, then `env`, then nullopt. Errors
// name the flag ("--rank=x: ...") or the variable ("MX_RANK=x: ...").
absl::StatusOr<std::optional<int64_t>> FlagOrEnvInt(const char* flag, const std::string& flag_text,
                                                    const char* env, int64_t min, int64_t max);

}  // namespace mx

#endif  // MX_NDARRAY_ENV_H_
