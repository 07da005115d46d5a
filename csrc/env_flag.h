// On/off switches read from the environment per call (so a process, e.g. an A/B benchmark, can
// toggle them): unset or anything but "0" is on.
#pragma once
#include <cstdlib>
#include <cstring>

namespace cofi {

inline bool env_flag_on(const char* name) {
  const char* v = std::getenv(name);
  return v == nullptr || std::strcmp(v, "0") != 0;
}

}  // namespace cofi
