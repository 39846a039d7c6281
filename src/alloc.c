/* alloc.c: the worker's counting allocator. */
#include "alloc.h"

#include <stdlib.h>

void hd_alloc_arm(hd_alloc *a, size_t limit) {
  a->base = a->used;
  a->limit = limit;
  a->tripped = 0;
}

/* A lua_Alloc that counts every byte the state holds and refuses growth past
 * the limit. Once it has refused it keeps refusing, so a job cannot pcall its
 * way past the limit: the worker sees `tripped` and reports OOM whatever the
 * job returned. Frees and shrinks always succeed, as LuaJIT requires. */
void *hd_alloc_fn(void *ud, void *ptr, size_t osize, size_t nsize) {
  hd_alloc *a = ud;
  void *p;
  if (ptr == NULL) osize = 0;
  if (nsize == 0) {
    free(ptr);
    a->used -= osize;
    return NULL;
  }
  if (nsize > osize && a->limit != 0) {
    if (a->tripped || a->used - osize + nsize > a->base + a->limit) {
      a->tripped = 1;
      return NULL;
    }
  }
  p = realloc(ptr, nsize);
  if (p == NULL) {
    /* A failed shrink keeps the old block, which is still valid. */
    if (nsize <= osize) return ptr;
    a->tripped = a->limit != 0;
    return NULL;
  }
  a->used = a->used - osize + nsize;
  return p;
}
