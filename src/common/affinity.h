/* affinity.h: whether the calling thread may run on one CPU only. The host
 * and its workers poll for each other's frames only when they have more
 * than one: pinned to one CPU (as an nginx worker with worker_cpu_affinity
 * is, and its workers inherit the pin), the other side runs only once the
 * poller stops, and a blocking wait is one system call where polling takes
 * three. */
#ifndef HD_AFFINITY_H
#define HD_AFFINITY_H

#include <sched.h>

static inline int hd_one_cpu(void) {
  cpu_set_t set;
  CPU_ZERO(&set);
  return sched_getaffinity(0, sizeof set, &set) == 0 && CPU_COUNT(&set) == 1;
}

#endif
