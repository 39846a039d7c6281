/* alloc.h: the worker's allocator: a counted heap limit per job, and the
 * state image that makes every job's lua_State fresh at the cost of a copy. */
#ifndef HD_ALLOC_H
#define HD_ALLOC_H

#include <stddef.h>

/* A block the job allocated; blocks form a list so they can all be freed at
 * once when the state is restored. The header keeps 16-byte alignment. */
typedef struct hd_blk {
  struct hd_blk *prev, *next;
  size_t size, pad;
} hd_blk;

/* Small blocks (ALLOC_SMALL_MAX bytes or less) come from chunks, by size
 * class of 16 bytes: a freed one goes on its class's list for the next of
 * its size, and the restore frees the chunks, not the blocks. */
#define HD_ALLOC_SMALL_MAX 512
#define HD_ALLOC_CLASSES (HD_ALLOC_SMALL_MAX / 16 + 1)

typedef struct hd_chunk {
  struct hd_chunk *next;
  size_t pad;            /* keeps the blocks after it 16-byte aligned */
} hd_chunk;

typedef struct hd_alloc {
  /* The image region: the pristine state lives here, at the same address in
   * the supervisor and in every worker forked from it. */
  char *region;
  size_t region_cap;
  size_t bump;           /* bytes of the region handed out while building */
  int building;          /* the pristine state is being built */
  char *snapshot;        /* the region's bytes once built */
  size_t snap_used;      /* `used` at snapshot time: the baseline */
  unsigned char *live;   /* while building: a bit per 16 bytes of the
                          * region, set where a block lives */
  size_t live_cap;       /* bytes of `live` */
  int live_lost;         /* `live` could not grow once: no map from then on */
  size_t *ranges;        /* the snapshot's live parts: offset, length pairs */
  size_t nranges;
  size_t *fixed;         /* live parts that only a known writer changes (the
                          * codec's name cache): left out of `ranges`,
                          * copied back only after that writer ran */
  size_t nfixed, capfixed;
  hd_blk head;           /* the job's blocks larger than HD_ALLOC_SMALL_MAX */
  hd_chunk *chunks;      /* the job's chunks of small blocks */
  hd_chunk *spare;       /* one chunk the restore kept for the next job */
  char *bump_at, *bump_end; /* what is left of the newest chunk */
  void *free_small[HD_ALLOC_CLASSES]; /* freed small blocks, by class */
  size_t used;           /* bytes the state holds now */
  size_t peak;           /* the most `used` was since the limit was armed */
  size_t base;           /* the baseline of the limit */
  size_t limit;          /* bytes allowed above the baseline; 0: no limit */
  int tripped;           /* refused once, refusing from then on */
  int taint;             /* the job touched state outside the Lua heap */
} hd_alloc;

void *hd_alloc_fn(void *ud, void *ptr, size_t osize, size_t nsize);

/* Reserves the image region and starts building into it. */
int hd_alloc_init(hd_alloc *a, size_t region_cap);

/* Goes back to building, to change the pristine state (a fresh worker, its
 * state just restored, with no block of its own). */
void hd_alloc_rebuild(hd_alloc *a);

/* Marks [p, p + n), memory of the state being built, as fixed: the whole
 * 16-byte units of it are left out of the restore unless hd_alloc_restore
 * is told they may have changed. Best effort (without memory for the list,
 * the part is restored as any other). hd_alloc_unfix forgets them all. */
void hd_alloc_fix(hd_alloc *a, const void *p, size_t n);
void hd_alloc_unfix(hd_alloc *a);

/* Ends building and takes the snapshot. */
int hd_alloc_snapshot(hd_alloc *a);

/* Arms the limit from the current usage. */
void hd_alloc_arm(hd_alloc *a, size_t limit);

/* Frees every block of the job and copies the snapshot back: the state is
 * then exactly the pristine one again, given that the fixed parts are
 * unchanged or `fixed_changed` says they may have changed. */
void hd_alloc_restore(hd_alloc *a, int fixed_changed);

#endif
