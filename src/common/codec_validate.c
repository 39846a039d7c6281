/* codec_validate.c: a worker's reply checked without a lua_State, the metatable rule for hostile messages, and a reply's shape. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

#include "codec_int.h"
#include "codec_walk.h"

/* ------------------------------------------------------------------------ */
/* Metatables in hostile messages                                           */
/* ------------------------------------------------------------------------ */

/* A result is data, but a metatable makes ordinary uses of it (t.x,
 * tostring(t), t == u) call functions, and the only functions a hostile
 * message can hold are the host's own, sent by name. So a hostile message
 * is refused when a metatable reaches a named value it counts (hd_decode:
 * one that turned out to be a function; hd_validate, which cannot look
 * names up: any). A metatable reaches the tables nested in it, their
 * metatables, and through references whatever those reach, wherever it was
 * first sent: reach rather than nesting, so that the verdict does not depend
 * on where the encoder happened to write a shared table first. Data-only
 * metatables, and named values no metatable reaches, still travel.
 *
 * cx_mt_reach checks this in one more walk over a message already known to
 * be well formed, needed only when it has a metatable and a counted named
 * value inside a table. A table's reach is its subtree (the tables nested in
 * it, metatables included) and the reach of every table a reference inside
 * that subtree points to. References point back only: to a table complete
 * already, whose verdict is known, or to one still open around the
 * reference, whose reach then equals this table's own; such a table is
 * linked to the outermost one and shares its verdict once that one closes
 * (union-find, so linear time). Per table it keeps one word: */
#define MR_ROOT (UINT64_C(1) << 63) /* used as a metatable */
#define MR_LINK (UINT64_C(1) << 61) /* verdict is that of the table numbered below */
#define MR_OPEN (UINT64_C(2) << 61) /* still open, at the depth below */
#define MR_TAG (UINT64_C(3) << 61)  /* none of these: closed, and below is the verdict */
#define MR_VAL ((UINT64_C(1) << 61) - 1)

typedef struct mr_frame {
  uint64_t ref;
  uint64_t acc; /* offset just after a counted named value it reaches, or 0 */
  int up;       /* depth of the outermost open table a reference in it leads to */
} mr_frame;

typedef struct mr_state {
  uint64_t *st; /* a word per table, numbered as refs are */
  cx_counts_fn counts;
  void *ud;
  mr_frame frames[HD_MAX_DEPTH];
} mr_state;

#define MR(w) ((mr_state *)(w)->ud)

/* Follows the links from table x to the table whose verdict it shares,
 * shortening the path on the way. */
static uint64_t mr_find(uint64_t *st, uint64_t x) {
  uint64_t r = x, next;
  while ((st[r] & MR_TAG) == MR_LINK) r = st[r] & MR_VAL;
  while (x != r) {
    next = st[x] & MR_VAL;
    st[x] = (st[x] & MR_ROOT) | MR_LINK | r;
    x = next;
  }
  return r;
}

static void mr_table(cx_walk *w, int at, int array, uint64_t narr, uint64_t nhash,
                     size_t narr_left) {
  mr_state *m = MR(w);
  mr_frame *f = &m->frames[w->depth];
  (void)array;
  (void)narr;
  (void)nhash;
  (void)narr_left;
  m->st[w->nrefs] = MR_OPEN | (uint64_t)w->depth | (at == CX_AT_MT ? MR_ROOT : 0);
  f->ref = w->nrefs;
  f->acc = 0;
  f->up = w->depth;
}

static int mr_ref(cx_walk *w, int at, uint64_t x) {
  mr_state *m = MR(w);
  if (w->depth > 0) {
    mr_frame *f = &m->frames[w->depth - 1];
    uint64_t r = mr_find(m->st, x);
    if (at == CX_AT_MT) m->st[x] |= MR_ROOT;
    if ((m->st[r] & MR_TAG) == MR_OPEN) {
      if ((int)(m->st[r] & MR_VAL) < f->up) f->up = (int)(m->st[r] & MR_VAL);
    } else if (f->acc == 0) {
      f->acc = m->st[r] & MR_VAL;
    }
  }
  return CX_K_TABLE;
}

static int mr_named(cx_walk *w, int at, const unsigned char *mod, size_t mlen,
                    const unsigned char *field, size_t flen) {
  mr_state *m = MR(w);
  (void)mod;
  (void)mlen;
  (void)field;
  (void)flen;
  if (w->depth > 0 && (m->counts == NULL || m->counts(m->ud, w->nnamed))) {
    mr_frame *f = &m->frames[w->depth - 1];
    /* A named metatable is refused at once; otherwise the table it is in
     * now reaches it. */
    if (at == CX_AT_MT) return CX_STOP;
    if (f->acc == 0) f->acc = (uint64_t)(w->p - w->start);
  }
  return CX_K_NAMED;
}

/* Table f is complete: settle its verdict, or link it. */
static void mr_close(cx_walk *w) {
  mr_state *m = MR(w);
  int d = w->depth - 1;
  mr_frame *f = &m->frames[d];
  uint64_t *s = &m->st[f->ref];
  if (f->up < d)
    *s = (*s & MR_ROOT) | MR_LINK | m->frames[f->up].ref;
  else
    *s = (*s & MR_ROOT) | f->acc;
  if (d > 0) {
    mr_frame *outer = &m->frames[d - 1];
    if (outer->acc == 0) outer->acc = f->acc;
    if (f->up < outer->up) outer->up = f->up;
  }
}

/* It follows tables, references and named values; the rest it only reads. */
static const cx_ops mr_ops = {.table = mr_table, .ref = mr_ref, .named = mr_named, .close = mr_close};

size_t cx_mt_reach(const unsigned char *start, size_t len, uint64_t *st, uint64_t ntables,
                   cx_counts_fn counts, void *ud) {
  mr_state m;
  cx_walk w;
  uint64_t x;
  m.st = st;
  m.counts = counts;
  m.ud = ud;
  cx_walk_init(&w, start, len, 0, &m);
  w.max_refs = ntables;
  switch (cx_walk_run(&w, &mr_ops)) {
    case CX_WALK_STOPPED:
      return w.at;
    case CX_WALK_BAD:
      /* Not for a message the caller accepted; what it cannot read, it
       * refuses. */
      return w.at > 0 ? w.at : 1;
    default:
      break;
  }
  for (x = 0; x < w.nrefs; x++) {
    if (st[x] & MR_ROOT) {
      uint64_t v = st[mr_find(st, x)] & MR_VAL;
      if (v != 0) return (size_t)v;
    }
  }
  return 0;
}

/* ------------------------------------------------------------------------ */
/* Validator                                                                */
/* ------------------------------------------------------------------------ */

/* hd_validate walks a message as hd_decode(…, 0) does, the same walker with
 * no hooks: it builds nothing, and the walker counts the decoder's Lua stack
 * use to apply CX_DEC_SLOTS. The metatable rule takes cx_mt_reach's second
 * walk, only for messages that have a metatable and a named value inside a
 * table. */

/* cx_mt_reach's words for this many tables fit on the C stack. */
#define VAL_REACH_INLINE 512

/* No hooks: it builds nothing. */
static const cx_ops val_ops = {.room = NULL};

/* Writes "handler: bad message: <what> at byte <at>" into err. */
static int val_bad(char *err, size_t errlen, const char *what, int tag, size_t at) {
  if (err != NULL && errlen > 0) {
    if (what != NULL)
      snprintf(err, errlen, CX_MSG_BAD "%s at byte %zu", what, at);
    else
      snprintf(err, errlen, CX_MSG_BAD "unknown tag %d at byte %zu", tag, at);
  }
  return -1;
}

int hd_validate(const char *msg, size_t len, char *err, size_t errlen) {
  return hd_validate_flags(msg, len, 0, err, errlen);
}

int hd_validate_flags(const char *msg, size_t len, int flags, char *err, size_t errlen) {
  cx_walk w;
  cx_walk_init(&w, msg, len, 0, NULL);
  if (cx_walk_run(&w, &val_ops) != CX_WALK_OK) return val_bad(err, errlen, w.what, w.tag, w.at);
  if ((flags & HD_VAL_NO_NAMES) && w.nnamed > 0) {
    if (err != NULL && errlen > 0)
      snprintf(err, errlen, "handler: bad message: a value by name from a sandboxed worker");
    return -1;
  }
  if (w.saw_mt && w.named_in_table) {
    uint64_t inline_st[VAL_REACH_INLINE], *st = inline_st;
    size_t at;
    /* A table takes four bytes at least, so this is at most 2 * len. */
    if (w.nrefs > VAL_REACH_INLINE && (st = malloc((size_t)w.nrefs * sizeof *st)) == NULL) {
      if (err != NULL && errlen > 0) snprintf(err, errlen, CX_MSG_OOM);
      return -1;
    }
    at = cx_mt_reach(w.start, len, st, w.nrefs, NULL, NULL);
    if (st != inline_st) free(st);
    if (at != 0) return val_bad(err, errlen, CX_MSG_NAMED_MT, 0, at);
  }
  return 0;
}

/* ------------------------------------------------------------------------ */
/* A reply's shape                                                          */
/* ------------------------------------------------------------------------ */

void hd_msg_info_of(const char *p, size_t len, hd_msg_info *info) {
  const unsigned char *u = (const unsigned char *)p, *end = u + len;
  info->count = 0;
  info->first_is_string = 0;
  if (cx_uv_read(&u, end, &info->count) != 0) return;
  info->first_is_string = info->count > 0 && u < end && (*u == CX_T_STR || *u == CX_T_KSET);
}
