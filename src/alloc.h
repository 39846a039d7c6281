/* alloc.h: the worker's counting allocator, which gives each job a heap limit. */
#ifndef HD_ALLOC_H
#define HD_ALLOC_H

#include <stddef.h>

typedef struct hd_alloc {
  size_t used;   /* bytes the state holds now */
  size_t base;   /* bytes held when the limit was armed: the baseline */
  size_t limit;  /* bytes allowed above the baseline; 0 means no limit */
  int tripped;   /* set at the first refusal, and refusing from then on */
} hd_alloc;

void *hd_alloc_fn(void *ud, void *ptr, size_t osize, size_t nsize);

/* Arms the limit from the current usage. */
void hd_alloc_arm(hd_alloc *a, size_t limit);

#endif
