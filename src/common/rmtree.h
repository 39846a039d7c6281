/* rmtree.h: removes a directory and everything in it, without following links. */
#ifndef HD_RMTREE_H
#define HD_RMTREE_H

#include <ftw.h>
#include <stdio.h>

/* Descriptors nftw may hold open while it walks. */
#define HD_RMTREE_FDS 16

static inline int hd_rm_entry(const char *path, const struct stat *st, int flag, struct FTW *ftw) {
  (void)st;
  (void)flag;
  (void)ftw;
  remove(path);
  return 0;
}

/* Best effort: what cannot be removed stays. */
static inline void hd_rm_tree(const char *dir) {
  nftw(dir, hd_rm_entry, HD_RMTREE_FDS, FTW_DEPTH | FTW_PHYS);
}

#endif
