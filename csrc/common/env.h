// Tuning knobs read from the environment (positive integers; anything else means "use the default").
#pragma once
#include <cstdint>
#include <cstdlib>

namespace xmodal {

inline int64_t env_int(const char* name, int64_t fallback) {
  const char* value = std::getenv(name);
  const int64_t parsed = value ? std::atoll(value) : 0;
  return parsed > 0 ? parsed : fallback;
}

}  // namespace xmodal
