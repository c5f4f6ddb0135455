// Tuning knobs read from the environment: positive integers (anything else means "use the default") and
// switches.
#pragma once
#include <cstdint>
#include <cstdlib>

namespace xmodal {

inline int64_t env_int(const char* name, int64_t fallback) {
  const char* value = std::getenv(name);
  const int64_t parsed = value ? std::atoll(value) : 0;
  return parsed > 0 ? parsed : fallback;
}

// An on/off switch: set to 1 means on.
inline bool env_flag(const char* name) {
  const char* value = std::getenv(name);
  return value && value[0] == '1' && value[1] == '\0';
}

}  // namespace xmodal
