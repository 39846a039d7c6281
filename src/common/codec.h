/* codec.h: the one value codec, used by the parent for closures and the
 * worker for results, and by the parent to decode a worker's hostile reply. */
#ifndef HD_CODEC_H
#define HD_CODEC_H

#include <lua.h>

#include "buf.h"

/* Encoder flags. */
#define HD_ENC_FUNCTIONS 1 /* Lua functions travel as bytecode (parent → worker) */
#define HD_ENC_HOST 2      /* the host encoding a job: a value sent by name must come from a
                            * module a worker can load (a standard one, or one on the host's
                            * package.path or package.cpath), and a value hd_refuse marked
                            * raises (see hd_encode) */

#define HD_ENC_ARGS 4      /* the values after the first are a job's arguments: a culprit
                            * among them is named "argument #n", not "value #n+1" */
#define HD_ENC_ITEM 8      /* the values are an item's arguments (HD_JOB_ITEMS): a culprit
                            * among them is named "argument #n" */

/* Decoder flags. */
#define HD_DEC_TRUSTED 1 /* bytecode may be loaded and names may be require()d */
#define HD_DEC_NOGC 2    /* a long message is decoded with the collector paused, and
                          * what it would have done meanwhile is not made up: for a
                          * worker's job, whose values are live until the job ends
                          * and whose heap is thrown away then (see hd_decode) */

/* Deepest nesting of tables and functions either side accepts. */
#define HD_MAX_DEPTH 200

/* Appends to `out` the n values on the stack from index `first`. Raises a Lua
 * error (a string naming the value that cannot travel and where it sits) on
 * a value that cannot travel, or when memory runs out; `out` stays owned by
 * the caller either way. The stack is left balanced. The NULL light
 * userdata travels as itself; other light and full userdata only by name.
 * With HD_ENC_HOST, "handler: cannot send a <type>: <where> is <why>" for a
 * value of a module that exists only in this process, and for a value
 * hd_refuse marked. */
void hd_encode(lua_State *L, int first, int n, hd_buf *out, int flags);

/* Marks the table, function or userdata at `value` as one that must not
 * travel in a job (HD_ENC_HOST): encoding it raises "... <where> is
 * <what>", `what` being the string at index `what` (nil: the mark is
 * lifted). The marks are kept in a weak-keyed table in the registry: they
 * do not keep a value alive. Until the first mark, the encoder does not
 * look for them. */
void hd_refuse(lua_State *L, int value, int what);

/* For a worker's image: reports through fix(ud, p, n) the memory of the
 * name cache that only the codec writes, the hash parts of its tables and
 * of the standard name sets and the filter's bits, so that the per-job
 * restore can leave it out. The cache's tables become strong (the
 * collector never clears an entry of a strong table). Where LuaJIT's
 * table layout is not the expected one, or no cache was built, it reports
 * nothing and returns -1. hd_codec_names_touched says whether the codec
 * wrote to the cache or the sets since (and forgets it): then that memory
 * must be restored too. Code that reaches the cache otherwise (through
 * debug.getregistry, say) must be kept from running, or restored after. */
int hd_codec_names_fixed(lua_State *L, void (*fix)(void *ud, const void *p, size_t n),
                         void *ud);
int hd_codec_names_touched(void);

/* Decodes a whole message of `len` bytes, pushes its values and returns how
 * many. Raises a Lua error (a string) on malformed input. Without
 * HD_DEC_TRUSTED the bytes are treated as hostile: no bytecode is loaded,
 * names are only looked up in package.loaded, every length and count is
 * checked against the bytes that remain before anything is allocated, and a
 * message in which a metatable reaches a named function is refused ("a named
 * value in a metatable"), so that using a result calls no host function.
 * Size hints preallocate at most what the bytes after them could fill, and
 * a message's hints together at most CX_HINT_BYTES_PER_BYTE bytes per byte
 * (codec_int.h). Metatables are set once the whole message is read; in
 * hostile mode each (unless it is a named value) first loses the keys
 * LuaJIT acts on, but for __index and __newindex holding tables, so that
 * results are plain data. */
int hd_decode(lua_State *L, const char *p, size_t len, int flags);

/* Whether the message is exactly two values, true and a string: then *s
 * and *slen give the string's bytes, in the message. Returns 0, or -1 for
 * any other message (nothing is decoded). */
int hd_decode_true_string(const char *p, size_t len, const char **s, size_t *slen);

/* Room enough for any message hd_validate writes. */
#define HD_VALIDATE_ERRLEN 160

/* Checks, without a lua_State and in time linear in `len`, that the message
 * of `len` bytes would decode as a worker's reply (hd_decode with flags 0):
 * the same wire format, limits and rules, and the same error messages. It
 * cannot look names up, so it checks only that NAMED records are well formed,
 * and where hd_decode refuses a named function (any a metatable reaches) it
 * refuses any named value. So whatever it accepts hd_decode(…, 0) accepts
 * too, unless a name is missing from package.loaded, or the caller of
 * hd_decode holds more than a few dozen Lua stack slots of its own. Returns
 * 0 when valid; otherwise -1, with "handler: bad message: <what> at byte
 * <offset>" (or "handler: out of memory") written into err (errlen bytes,
 * cut and NUL-terminated; err may be NULL). Allocates nothing, except for a
 * message with a metatable, a named value inside a table and more than 512
 * tables: then 8 bytes per table (at most 2 * len), freed before it returns. */
int hd_validate(const char *p, size_t len, char *err, size_t errlen);

/* Validator flags. */
#define HD_VAL_NO_NAMES 1 /* refuse any value sent by name: the reply of a sandboxed
                           * worker, which must not hand its caller the host's own
                           * tables (_G, package.loaded, debug) by naming them */

/* hd_validate, with flags. */
int hd_validate_flags(const char *p, size_t len, int flags, char *err, size_t errlen);

/* Writes to `out` a whole message of n strings (n may be 0), exactly as
 * hd_encode would write them, without a lua_State: the worker's own replies
 * (an error text, an empty OOM reply) are built with it. Returns 0, or -1
 * when memory runs out. */
int hd_encode_strings(hd_buf *out, int n, const char *const *s, const size_t *len);

/* What a valid message holds, as far as a frame's shape needs to know: how
 * many values, and whether the first is a string. Only for a message
 * hd_validate accepted. */
typedef struct hd_msg_info {
  uint64_t count;
  int first_is_string;
} hd_msg_info;

void hd_msg_info_of(const char *p, size_t len, hd_msg_info *info);

#endif
