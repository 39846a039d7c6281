/* num.h: conversions from Lua numbers that are defined for every double. */
#ifndef HD_NUM_H
#define HD_NUM_H

#include <stdint.h>

/* A double as a uint64_t: NaN and negatives are 0, values at or past 2^64
 * (math.huge included) are UINT64_MAX. A plain cast is undefined there. */
static inline uint64_t hd_u64_of(double v) {
  if (!(v > 0)) return 0;
  if (v >= 18446744073709551616.0) return UINT64_MAX;
  return (uint64_t)v;
}

#endif
