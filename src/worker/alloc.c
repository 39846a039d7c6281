/* alloc.c: the worker's allocator and its state image. */
#include "alloc.h"

#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

int hd_alloc_init(hd_alloc *a, size_t region_cap) {
  memset(a, 0, sizeof *a);
  a->region = mmap(NULL, region_cap, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (a->region == MAP_FAILED) {
    a->region = NULL;
    return -1;
  }
  a->region_cap = region_cap;
  a->building = 1;
  a->head.next = a->head.prev = &a->head;
  return 0;
}

void hd_alloc_rebuild(hd_alloc *a) {
  a->building = 1;
}

/* The image's live blocks, and the holes the blocks freed while building
 * leave between them: a hole is never touched again (a job's blocks come
 * from malloc), so the restore copies the live parts only. A bit per
 * granule of 16 bytes; `live` grows with the region's use. */
#define ALLOC_GRAIN 16
/* Holes shorter than this are copied with the blocks around them: a
 * memcpy more costs more than that many bytes. */
#define ALLOC_MIN_HOLE 256

static void alloc_mark(hd_alloc *a, const char *p, size_t n, int on) {
  size_t g, end;
  /* Without a map (out of memory once), everything is copied. */
  if (a->live == NULL || p < a->region || p >= a->region + a->bump) return;
  g = (size_t)(p - a->region) / ALLOC_GRAIN;
  end = g + (n + ALLOC_GRAIN - 1) / ALLOC_GRAIN;
  for (; g < end; g++) {
    if (on) a->live[g >> 3] |= (unsigned char)(1u << (g & 7));
    else a->live[g >> 3] &= (unsigned char)~(1u << (g & 7));
  }
}

/* Makes room in `live` for the region's first `bump` bytes; on failure
 * the map is dropped for good and the restore copies all of them. */
static void alloc_live_reserve(hd_alloc *a, size_t bump) {
  size_t need = (bump / ALLOC_GRAIN + 7) / 8;
  unsigned char *m;
  if (a->live_lost || need <= a->live_cap) return;
  need = need < 4096 ? 4096 : need * 2;
  m = realloc(a->live, need);
  if (m == NULL) {
    free(a->live);
    a->live = NULL;
    a->live_lost = 1;
    return;
  }
  memset(m + a->live_cap, 0, need - a->live_cap);
  a->live = m;
  a->live_cap = need;
}

static int alloc_live_at(const hd_alloc *a, size_t g) {
  return (a->live[g >> 3] >> (g & 7)) & 1;
}

void hd_alloc_unfix(hd_alloc *a) {
  a->nfixed = 0;
}

void hd_alloc_fix(hd_alloc *a, const void *p, size_t n) {
  const char *c = p;
  size_t from, to;
  if (a->live == NULL || c < a->region || c >= a->region + a->bump ||
      n > (size_t)(a->region + a->bump - c))
    return;
  from = ((size_t)(c - a->region) + ALLOC_GRAIN - 1) / ALLOC_GRAIN * ALLOC_GRAIN;
  to = ((size_t)(c - a->region) + n) / ALLOC_GRAIN * ALLOC_GRAIN;
  if (to <= from) return;
  if (a->nfixed == a->capfixed) {
    size_t cap = a->capfixed ? a->capfixed * 2 : 8;
    size_t *m = realloc(a->fixed, cap * 2 * sizeof *m);
    if (m == NULL) return;
    a->fixed = m;
    a->capfixed = cap;
  }
  a->fixed[2 * a->nfixed] = from;
  a->fixed[2 * a->nfixed + 1] = to - from;
  a->nfixed++;
}

/* Sets or clears the fixed parts' units in the live map. */
static void alloc_mark_fixed(hd_alloc *a, int on) {
  size_t k;
  for (k = 0; k < a->nfixed; k++)
    alloc_mark(a, a->region + a->fixed[2 * k], a->fixed[2 * k + 1], on);
}

/* The live parts of the region's first `bump` bytes, holes of
 * ALLOC_MIN_HOLE bytes or more left out; without a map, or without memory
 * for more ranges, all of it in one (returns 1 then). */
static int alloc_ranges(hd_alloc *a) {
  size_t grains = a->bump / ALLOC_GRAIN, g = 0, n = 0, cap = 64;
  size_t *r = malloc(cap * 2 * sizeof *r);
  if (r == NULL) return -1;
  free(a->ranges);
  a->ranges = r;
  a->nranges = 1;
  r[0] = 0;
  r[1] = a->bump;
  if (a->live == NULL) return 1;
  while (g < grains) {
    size_t start, end;
    while (g < grains && !alloc_live_at(a, g)) g++;
    if (g == grains) break;
    start = g;
    for (;;) {
      size_t hole;
      while (g < grains && alloc_live_at(a, g)) g++;
      end = g;
      hole = g;
      while (hole < grains && !alloc_live_at(a, hole)) hole++;
      if (hole == grains || (hole - g) * ALLOC_GRAIN >= ALLOC_MIN_HOLE) break;
      g = hole;
    }
    if (n == cap) {
      size_t *m = realloc(a->ranges, cap * 4 * sizeof *m);
      if (m == NULL) {
        a->ranges[0] = 0;
        a->ranges[1] = a->bump;
        a->nranges = 1;
        return 1;
      }
      a->ranges = m;
      cap *= 2;
    }
    a->ranges[2 * n] = start * ALLOC_GRAIN;
    a->ranges[2 * n + 1] = (end - start) * ALLOC_GRAIN;
    n++;
  }
  a->nranges = n;
  return 0;
}

int hd_alloc_snapshot(hd_alloc *a) {
  int rc;
  free(a->snapshot);
  a->snapshot = malloc(a->bump ? a->bump : 1);
  if (a->snapshot == NULL) return -1;
  memcpy(a->snapshot, a->region, a->bump);
  /* The fixed parts are left out of the ranges; the map stays whole for a
   * later rebuild. When the ranges are all of it, nothing is fixed. */
  alloc_mark_fixed(a, 0);
  rc = alloc_ranges(a);
  alloc_mark_fixed(a, 1);
  if (rc < 0) return -1;
  if (rc > 0) a->nfixed = 0;
  a->building = 0;
  a->snap_used = a->used;
  return 0;
}

void hd_alloc_arm(hd_alloc *a, size_t limit) {
  a->base = a->used;
  a->peak = a->used;
  a->limit = limit;
  a->tripped = 0;
}

/* Copies the snapshot's bytes back over n (offset, length) pairs. */
static void alloc_copy_back(hd_alloc *a, const size_t *parts, size_t n) {
  size_t k;
  for (k = 0; k < n; k++)
    memcpy(a->region + parts[2 * k], a->snapshot + parts[2 * k], parts[2 * k + 1]);
}

void hd_alloc_restore(hd_alloc *a, int fixed_changed) {
  hd_blk *b = a->head.next;
  hd_chunk *c = a->chunks;
  while (b != &a->head) {
    hd_blk *next = b->next;
    free(b);
    b = next;
  }
  a->head.next = a->head.prev = &a->head;
  /* Every job has a chunk at least: one stays for the next (a malloc and
   * a free less per job; its bytes are the next job's to overwrite, as
   * malloc's would be). */
  while (c != NULL) {
    hd_chunk *next = c->next;
#ifndef __SANITIZE_ADDRESS__
    /* Under AddressSanitizer every chunk goes, so that a pointer kept
     * into a job's memory shows as a use after free. */
    if (a->spare == NULL) {
      a->spare = c;
      c = next;
      continue;
    }
#endif
    free(c);
    c = next;
  }
  a->chunks = NULL;
  a->bump_at = a->bump_end = NULL;
  memset(a->free_small, 0, sizeof a->free_small);
  alloc_copy_back(a, a->ranges, a->nranges);
  if (fixed_changed) alloc_copy_back(a, a->fixed, a->nfixed);
  a->used = a->snap_used;
  a->limit = 0;
  a->tripped = 0;
  a->taint = 0;
}

static int alloc_in_region(const hd_alloc *a, const void *p) {
  return p != NULL && (const char *)p >= a->region && (const char *)p < a->region + a->region_cap;
}

static void *alloc_blk_new(hd_alloc *a, size_t n) {
  hd_blk *b;
  if (n > SIZE_MAX - sizeof *b) return NULL;
  b = malloc(sizeof *b + n);
  if (b == NULL) return NULL;
  b->size = n;
  b->next = a->head.next;
  b->prev = &a->head;
  a->head.next->prev = b;
  a->head.next = b;
  return b + 1;
}

/* Bytes of one chunk of small blocks, its header included. */
#define ALLOC_CHUNK (64 * 1024)

static size_t alloc_class(size_t n) {
  return (n + 15) >> 4;
}

static void *alloc_small_new(hd_alloc *a, size_t n) {
  size_t c = alloc_class(n), sz = c << 4;
  void *p = a->free_small[c];
  if (p != NULL) {
    a->free_small[c] = *(void **)p;
    return p;
  }
  if ((size_t)(a->bump_end - a->bump_at) < sz) {
    hd_chunk *k = a->spare != NULL ? a->spare : malloc(ALLOC_CHUNK);
    if (k == NULL) return NULL;
    a->spare = NULL;
    k->next = a->chunks;
    a->chunks = k;
    a->bump_at = (char *)(k + 1);
    a->bump_end = (char *)k + ALLOC_CHUNK;
  }
  p = a->bump_at;
  a->bump_at += sz;
  return p;
}

static void alloc_small_free(hd_alloc *a, void *p, size_t n) {
  size_t c = alloc_class(n);
  *(void **)p = a->free_small[c];
  a->free_small[c] = p;
}

static void alloc_blk_free(void *p) {
  hd_blk *b = (hd_blk *)p - 1;
  b->prev->next = b->next;
  b->next->prev = b->prev;
  free(b);
}

/* A lua_Alloc that counts every byte the state holds and refuses growth past
 * the limit. Once it has refused it keeps refusing, so a job cannot pcall
 * its way past the limit: the worker sees `tripped` and reports OOM whatever
 * the job returned. Frees and shrinks always succeed, as LuaJIT requires.
 * Blocks in the image region are never freed one by one: the restore copies
 * the whole region back. A block's kind follows from the size LuaJIT gives
 * with it: HD_ALLOC_SMALL_MAX bytes or less, a small block of a chunk. */
void *hd_alloc_fn(void *ud, void *ptr, size_t osize, size_t nsize) {
  hd_alloc *a = ud;
  void *p;
  if (ptr == NULL) osize = 0;
  if (nsize == 0) {
    if (ptr != NULL && !alloc_in_region(a, ptr)) {
      if (osize <= HD_ALLOC_SMALL_MAX) alloc_small_free(a, ptr, osize);
      else alloc_blk_free(ptr);
    } else if (ptr != NULL && a->building) {
      alloc_mark(a, ptr, osize, 0);
    }
    a->used -= osize;
    return NULL;
  }
  if (nsize > osize && a->limit != 0) {
    /* Counted above the baseline, so a limit near SIZE_MAX cannot wrap. */
    size_t want = a->used - osize + nsize;
    if (a->tripped || (want > a->base && want - a->base > a->limit)) {
      a->tripped = 1;
      return NULL;
    }
  }
  if (a->building) {
    /* The pristine state: a bump allocation in the region. */
    size_t sz = (nsize + 15) & ~(size_t)15;
    if (ptr != NULL && nsize <= osize) {
      a->used -= osize - nsize;
      return ptr;
    }
    if (sz > a->region_cap - a->bump) return NULL;
    p = a->region + a->bump;
    alloc_live_reserve(a, a->bump + sz);
    a->bump += sz;
    alloc_mark(a, p, sz, 1);
    if (ptr != NULL) {
      memcpy(p, ptr, osize);
      alloc_mark(a, ptr, osize, 0);
    }
    a->used = a->used - osize + nsize;
    return p;
  }
  if (ptr != NULL && alloc_in_region(a, ptr)) {
    if (nsize <= osize) {
      a->used -= osize - nsize;
      return ptr;
    }
    p = nsize <= HD_ALLOC_SMALL_MAX ? alloc_small_new(a, nsize) : alloc_blk_new(a, nsize);
    if (p == NULL) goto fail;
    memcpy(p, ptr, osize);
    a->used = a->used - osize + nsize;
    if (a->used > a->peak) a->peak = a->used;
    return p;
  }
  if (ptr == NULL) {
    p = nsize <= HD_ALLOC_SMALL_MAX ? alloc_small_new(a, nsize) : alloc_blk_new(a, nsize);
    if (p == NULL) goto fail;
  } else if (osize <= HD_ALLOC_SMALL_MAX || nsize <= HD_ALLOC_SMALL_MAX) {
    /* A small block on either side: within its class it stays; otherwise
     * it moves. A failed shrink keeps the old block, which is still valid. */
    if (osize <= HD_ALLOC_SMALL_MAX && nsize <= HD_ALLOC_SMALL_MAX &&
        alloc_class(osize) == alloc_class(nsize)) {
      p = ptr;
    } else {
      p = nsize <= HD_ALLOC_SMALL_MAX ? alloc_small_new(a, nsize) : alloc_blk_new(a, nsize);
      if (p == NULL) {
        if (nsize > osize) goto fail;
        /* A shrink must not fail: the block stays where it is, as a block
         * of the new size (a large block's memory stays on its list until
         * the restore, and is never freed as a large block again). */
        a->used -= osize - nsize;
        return ptr;
      }
      memcpy(p, ptr, osize < nsize ? osize : nsize);
      if (osize <= HD_ALLOC_SMALL_MAX) alloc_small_free(a, ptr, osize);
      else alloc_blk_free(ptr);
    }
  } else {
    hd_blk *b = (hd_blk *)ptr - 1, *nb;
    nb = realloc(b, sizeof *b + nsize);
    if (nb == NULL) {
      /* A failed shrink keeps the old block, which is still valid. */
      if (nsize > osize) goto fail;
      a->used -= osize - nsize;
      return ptr;
    }
    nb->size = nsize;
    nb->prev->next = nb;
    nb->next->prev = nb;
    p = nb + 1;
  }
  a->used = a->used - osize + nsize;
  if (a->used > a->peak) a->peak = a->used;
  return p;
fail:
  if (a->limit != 0) a->tripped = 1;
  return NULL;
}
