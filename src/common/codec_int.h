/* codec_int.h: what the codec's files share: the wire format's tags and limits, and their helpers. */
#ifndef HD_CODEC_INT_H
#define HD_CODEC_INT_H

#include <lua.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "codec.h"

/* Names. codec.h is the codec's API: hd_* (macros HD_*). What the codec's
 * files share, declared here, is cx_* (macros CX_*). What one file keeps to
 * itself is static and takes that file's prefix: enc_ (codec_encode.c),
 * dec_ (codec_decode.c), val_ and mr_ (codec_validate.c), nc_
 * (codec_names.c), tab_ (codec_tab.c), walk_ (codec_walk.h). */

/* Value tags of the wire format. */
enum {
  CX_T_NIL = 0, CX_T_FALSE = 1, CX_T_TRUE = 2, CX_T_NUM = 3, CX_T_STR = 4, /* scalars */
  CX_T_TABLE = 5, CX_T_TABLE_MT = 6, CX_T_END = 7, CX_T_REF = 8,          /* tables */
  CX_T_FUNC = 9, CX_T_UPJOIN = 10,                  /* functions (trusted messages only) */
  CX_T_NAMED_MOD = 11, CX_T_NAMED_FIELD = 12,       /* values sent by name */
  CX_T_NULL = 13, /* the NULL light userdata (cjson.null, ngx.null): no payload */
  /* A table whose first values are t[1], t[2]... in order, without their
   * keys (items); a KEYS marker then starts its keyed entries, if any. */
  CX_T_ARRAY = 14, CX_T_ARRAY_MT = 15, CX_T_KEYS = 16,
  CX_T_INT = 17,  /* a number that is an integer of at most 2^53: zigzag varint */
  CX_T_KSET = 18, /* a string, kept in a slot (u8) for KREF: slot, length, bytes */
  CX_T_KREF = 19  /* the string a KSET kept in a slot (u8) */
};

/* The slots of repeated strings (table keys, as the encoder sends them):
 * a record's keys travel once, then as a two-byte KREF. */
#define CX_KSLOTS 64

/* The longest key string the encoder keeps in a slot. */
#define CX_KSHORT 40

/* A table's array part in place (codec_tab.c): cx_tab_fast says whether
 * this VM's layout was found as expected (probed once, with L); then
 * cx_tab_array gives the 8-byte slots of the table object t
 * (lua_topointer) and their count, slot i holding t[i]: a number is its
 * double, nil is CX_TAB_NIL, anything else a NaN pattern (use the API). */
#define CX_TAB_NIL UINT64_MAX
#define CX_TAB_ARRAY 16 /* on GC64, where GCtab keeps the array's address */
#define CX_TAB_NODE 40  /* the hash part's */
#define CX_TAB_ASIZE 48 /* the array's size */
#define CX_TAB_HMASK 52 /* the hash part's size - 1 */
int cx_tab_fast(lua_State *L);
static inline uint64_t *cx_tab_array(const void *t, uint32_t *asize) {
  uint64_t a;
  memcpy(&a, (const char *)t + CX_TAB_ARRAY, sizeof a);
  memcpy(asize, (const char *)t + CX_TAB_ASIZE, sizeof *asize);
  return (uint64_t *)(uintptr_t)a;
}
/* The hash part: hmask + 1 nodes of three slots (value, key, chain), in
 * lua_next's order. */
static inline const uint64_t *cx_tab_nodes(const void *t, uint32_t *hmask) {
  uint64_t a;
  memcpy(&a, (const char *)t + CX_TAB_NODE, sizeof a);
  memcpy(hmask, (const char *)t + CX_TAB_HMASK, sizeof *hmask);
  return (const uint64_t *)(uintptr_t)a;
}
/* The bytes and length of the string a slot holds, or NULL for another
 * type: the tag ~4 in the top 17 bits, the object's address below, its
 * length at byte cx_tab_len_at (16 or 20: LuaJIT versions differ, the
 * probe finds which) and its bytes from byte 24 (as lua_tolstring gives). */
extern unsigned cx_tab_len_at;
static inline const char *cx_tab_str(uint64_t v, size_t *len) {
  const char *s;
  uint32_t n;
  if ((uint32_t)(v >> 47) != 0x1FFFBu) return NULL;
  s = (const char *)(uintptr_t)(v & ((UINT64_C(1) << 47) - 1));
  memcpy(&n, s + cx_tab_len_at, sizeof n);
  *len = n;
  return s + 24;
}

/* The largest integer INT carries: every integer up to it is a double. */
#define CX_INT_MAX 9007199254740992.0 /* 2^53 */

/* The longest varint (unsigned LEB128): ten bytes, the tenth holding bit 63
 * only. */
#define CX_UV_MAX 10
#define CX_UV_BITS 7    /* bits of the value in a byte, lowest first */
#define CX_UV_MORE 0x80 /* a varint byte's "another byte follows" bit */

/* A number is its eight bytes, little-endian. */
#define CX_NUM_BYTES 8

/* A C function may hold at most LUAI_MAXCSTACK Lua stack slots, counted
 * from its frame's base, so its caller's slots count too. The decoder keeps
 * to CX_DEC_SLOTS of them, counted from where it starts, whatever its caller
 * holds: whether a message decodes then depends on the message alone, which
 * is what lets hd_validate tell without a lua_State. The rest is left to the
 * caller (the decoders in lhandler.c, lcodec.c and worker.c hold one or two
 * slots). */
#ifndef LUAI_MAXCSTACK
#define LUAI_MAXCSTACK 8000
#endif
#define CX_DEC_SLOTS (LUAI_MAXCSTACK - 64)

/* The slots the decoder keeps spare beyond what it holds, each time it
 * opens a table or function and for the top-level values. */
#define CX_SPARE_SLOTS 8

/* The most top-level values in one message: all of them, the decoder's one
 * slot of its own and the ones it keeps spare fit in CX_DEC_SLOTS. The
 * encoder refuses more too, so that what one side sends the other can take. */
#define CX_MAX_VALUES (CX_DEC_SLOTS - 1 - CX_SPARE_SLOTS)

/* The most tables and functions in one message: the decoder keeps them in a
 * Lua table under int keys, after the CX_KSLOTS strings. */
#define CX_MAX_REFS (INT32_MAX - CX_KSLOTS - 1)

/* The most slots one table's size hint may preallocate. Hints only save
 * rehashing; a table that really is bigger still grows as it fills. */
#define CX_HINT_MAX (1u << 20)

/* The fewest bytes an entry takes on the wire: in a TABLE, an array entry
 * has a number key (INT and a one-byte varint) and a value of at least one
 * byte; an ARRAY's items are one byte at least; a hash entry is a one-byte
 * key (true) and value. A hint is cut to the entries the bytes after it
 * could hold. */
#define CX_MIN_ARRAY_ENTRY 3
#define CX_MIN_ITEM 1
#define CX_MIN_HASH_ENTRY 2

/* What the hints of one message may preallocate in all, in bytes of table
 * parts per byte of the message: enough for the hints an encoder writes for
 * real data (a hash of short string keys takes about 3 bytes of nodes per
 * byte on the wire), and the bound on what a lying header can cost. */
#define CX_HINT_BYTES_PER_BYTE 4

/* What LuaJIT allocates per slot: an array slot is a TValue; a hash node a
 * value, a key and a link, and the hash part is a power of two. */
#define CX_ARRAY_SLOT_BYTES 8
#define CX_HASH_NODE_BYTES 24

/* The encoder backpatches both size hints after the entries are counted, so
 * it writes them as varints of a fixed CX_HINT3_BYTES bytes, which hold at
 * most CX_HINT3_MAX (any varint decodes). */
#define CX_HINT3_BYTES 3
#define CX_HINT3_MAX ((1u << (CX_UV_BITS * CX_HINT3_BYTES)) - 1)

/* Function upvalues are keyed by func ref * CX_UPS_PER_REF + upvalue number
 * while encoding (LuaJIT allows fewer than CX_UPS_PER_REF upvalues). */
#define CX_UPS_PER_REF 256

/* How many bytes of a string key or a name an error message shows. */
#define CX_SHOWN 40

/* The start of every message about a refused message. */
#define CX_MSG_BAD "handler: bad message: "
#define CX_MSG_OOM "handler: out of memory"

/* Why a hostile message is refused when a metatable reaches a host function
 * (see cx_mt_reach). */
#define CX_MSG_NAMED_MT "a named value in a metatable"

/* Raises the value on the top of the stack. lua_error never returns, but it
 * is not declared so; abort() tells the compiler. */
_Noreturn static inline void cx_throw(lua_State *L) {
  lua_error(L);
  abort();
}

_Noreturn static inline void cx_oom(lua_State *L) {
  lua_pushliteral(L, CX_MSG_OOM);
  cx_throw(L);
}

/* Reads a varint at *pp, before end: 0 when read (into *out, *pp past it),
 * 1 when the message ends first (*pp at end), 2 when it is too long (*pp at
 * the bad byte). */
static inline int cx_uv_read(const unsigned char **pp, const unsigned char *end, uint64_t *out) {
  const unsigned char *p = *pp;
  uint64_t v = 0;
  int i;
  for (i = 0; i < CX_UV_MAX; i++) {
    unsigned c;
    if (p >= end) {
      *pp = p;
      return 1;
    }
    c = *p;
    if (i == CX_UV_MAX - 1 && c > 1) {
      *pp = p;
      return 2;
    }
    p++;
    v |= (uint64_t)(c & (CX_UV_MORE - 1)) << (CX_UV_BITS * i);
    if (!(c & CX_UV_MORE)) {
      *pp = p;
      *out = v;
      return 0;
    }
  }
  *pp = p;
  return 2;
}

/* Pushes s as a quoted, escaped string, cut after CX_SHOWN bytes, for error
 * messages that must stay readable whatever bytes a key or name holds. */
void cx_push_quoted(lua_State *L, const char *s, size_t len);

/* ------------------------------------------------------------------------ */
/* The name cache (codec_names.c): which values travel by name.              */
/* ------------------------------------------------------------------------ */

/* The cache is a table; its fields (see codec_names.c): */
enum { CX_NC_NAMES = 1, CX_NC_OWNER, CX_NC_SEEN, CX_NC_PRINT, CX_NC_NSEEN, CX_NC_FILTER };

/* CX_NC_FILTER is a userdata of CX_NC_FILTER_BITS bits: the bit of every
 * value NAMES has held is set, so that a clear bit says, without a lookup,
 * that a value has no name (a set one only that it may have). */
#define CX_NC_FILTER_LOG2 16
#define CX_NC_FILTER_BITS (1u << CX_NC_FILTER_LOG2)

/* The bit of the object at address p. */
static inline size_t cx_nc_bit(const void *p) {
  return (size_t)(((uint64_t)(uintptr_t)p * UINT64_C(0x9E3779B97F4A7C15)) >>
                  (64 - CX_NC_FILTER_LOG2));
}

static inline int cx_nc_maybe(const unsigned char *filter, const void *p) {
  size_t b = cx_nc_bit(p);
  return (filter[b / 8] >> (b % 8)) & 1;
}

/* Pushes the name cache, brought up to date; returns 1 when it was rebuilt
 * rather than reused. L: ... → ... nc */
int cx_names_push(lua_State *L);

/* Builds the name cache afresh and pushes it. L: ... → ... nc */
void cx_names_build(lua_State *L);

/* Which modules a worker can load (codec_names.c), for HD_ENC_HOST, as
 * its require would find them: the standard libraries, and the modules
 * package.path or package.cpath (the host's, which the workers get) finds
 * on this host. */

/* Pushes the set of module names a fresh state has loaded or preloaded
 * (name → true): the standard libraries. L: ... → ... set */
void cx_names_std_modules(lua_State *L);

/* Pushes the table of verdicts on other modules, emptied first when the
 * paths have changed since it was filled. L: ... → ... verdicts */
void cx_names_verdicts(lua_State *L);

/* Whether package.path or package.cpath finds the module named by the
 * string at `mod` on this host, as a worker's require would (a file the
 * templates name, or the C root of a submodule). Looks the verdict up in,
 * or adds it to, the table at `verdicts`. */
int cx_names_found(lua_State *L, int verdicts, int mod);

/* ------------------------------------------------------------------------ */
/* Metatables in hostile messages (codec_validate.c).                        */
/* ------------------------------------------------------------------------ */

/* Whether named value number k (from 0, in message order) counts. */
typedef int (*cx_counts_fn)(void *ud, uint64_t k);

/* Returns 0 when no metatable of the message (of ntables tables, accepted
 * by hd_validate or hd_decode(…, 0)) reaches a named value that `counts`
 * (NULL: every one), otherwise the offset just after such a named value. st
 * has room for ntables words. */
size_t cx_mt_reach(const unsigned char *start, size_t len, uint64_t *st, uint64_t ntables,
                   cx_counts_fn counts, void *ud);

#endif
