#include "ndarray/env.h"

#include <unistd.h>

#include <algorithm>
#include <csignal>
#include <cstdlib>
#include <iostream>
#include <string>
#include <vector>

#include "absl/flags/commandlineflag.h"
#include "absl/flags/parse.h"
#include "absl/flags/reflection.h"
#include "absl/flags/usage.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"

namespace mx {

std::string EnvString(const char* name) {
  const char* v = std::getenv(name);
  return v == nullptr ? "" : v;
}

absl::StatusOr<int64_t> ParseInt(const std::string& what, const std::string& text, int64_t min,
                                 int64_t max) {
  int64_t v = 0;
  if (!absl::SimpleAtoi(text, &v) || v < min || v > max) {
    return absl::InvalidArgumentError(
        absl::StrCat(what, "=", text, ": must be a whole number from ", min, " to ", max));
  }
  return v;
}

absl::StatusOr<std::optional<int64_t>> EnvInt(const char* name, int64_t min, int64_t max) {
  const std::string text = EnvString(name);
  if (text.empty()) return std::nullopt;
  return ParseInt(name, text, min, max);
}

absl::StatusOr<std::optional<bool>> EnvBool(const char* name) {
  const std::string text = EnvString(name);
  if (text.empty()) return std::nullopt;
  if (text != "0" && text != "1") {
    return absl::InvalidArgumentError(absl::StrCat(name, "=", text, ": must be 0 or 1"));
  }
  return text == "1";
}

absl::StatusOr<std::optional<int64_t>> FlagOrEnvInt(const char* flag, const std::string& flag_text,
                                                    const char* env, int64_t min, int64_t max) {
  if (!flag_text.empty()) return ParseInt(absl::StrCat("--", flag), flag_text, min, max);
  return EnvInt(env, min, max);
}

void ExitOnStopSignal(const char* program, int sig, const char* suffix) {
  // Built in a buffer by hand (no allocation, no stdio) and written at
  // once, so that the line does not interleave with other output.
  char line[256];
  size_t len = 0;
  auto append = [&](const char* text) {
    while (*text != '\0' && len < sizeof(line) - 1) line[len++] = *text++;
  };
  char number[4] = {static_cast<char>('0' + sig / 10 % 10), static_cast<char>('0' + sig % 10),
                    '\0', '\0'};
  append(program);
  append(": stopping (");
  append(sig == SIGTERM ? "SIGTERM" : sig == SIGINT ? "SIGINT" : number);
  append(")");
  append(suffix);
  append("\n");
  if (write(STDERR_FILENO, line, len) < 0) {
    // Nothing to do: the exit code still says why.
  }
  _exit(128 + sig);
}

void ExitOnHelpFlag(int argc, char** argv) {
  bool help = false;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    help = help || arg == "--help" || arg == "-help" || arg == "--helpfull" ||
           arg == "--helpshort" || arg == "-helpfull" || arg == "-helpshort";
  }
  if (!help) return;
  std::vector<const absl::CommandLineFlag*> flags;
  for (const auto& [name, flag] : absl::GetAllFlags()) {
    if (flag->Filename().find("absl/") == std::string::npos) flags.push_back(flag);
  }
  std::sort(flags.begin(), flags.end(), [](const auto* a, const auto* b) {
    return a->Name() < b->Name();
  });
  std::cout << absl::ProgramUsageMessage() << "\n\nFlags:\n";
  for (const absl::CommandLineFlag* flag : flags) {
    std::cout << "  --" << flag->Name() << " (" << flag->Help() << "); default: \""
              << flag->DefaultValue() << "\"\n";
  }
  std::cout.flush();
  std::exit(0);
}

void ParseFlags(int argc, char** argv) {
  ExitOnHelpFlag(argc, argv);
  const std::vector<char*> rest = absl::ParseCommandLine(argc, argv);
  if (rest.size() <= 1) return;  // rest[0] is the program
  std::cerr << argv[0] << ": unexpected argument '" << rest[1]
            << "': every setting is a --flag=value (a boolean flag's value too, as "
               "--elastic=false)"
            << std::endl;
  std::exit(1);
}

}  // namespace mx
