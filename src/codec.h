/* codec.h: the one value codec, used by the parent for closures and the
 * worker for results, and by the parent to decode a worker's hostile reply. */
#ifndef HD_CODEC_H
#define HD_CODEC_H

#include <lua.h>

#include "buf.h"

/* Encoder flags. */
#define HD_ENC_FUNCTIONS 1 /* Lua functions travel as bytecode (parent → worker) */

/* Decoder flags. */
#define HD_DEC_TRUSTED 1 /* bytecode may be loaded and names may be require()d */

/* Deepest nesting of tables and functions either side accepts. */
#define HD_MAX_DEPTH 200

/* Appends to `out` the n values on the stack from index `first`. Raises a Lua
 * error (a string naming the value that cannot travel and where it sits) on
 * a value that cannot travel, or when memory runs out; `out` stays owned by
 * the caller either way. The stack is left balanced. */
void hd_encode(lua_State *L, int first, int n, hd_buf *out, int flags);

/* Decodes a whole message of `len` bytes, pushes its values and returns how
 * many. Raises a Lua error (a string) on malformed input. Without
 * HD_DEC_TRUSTED the bytes are treated as hostile: no bytecode is loaded,
 * names are only looked up in package.loaded, every length and count is
 * checked against the bytes that remain before anything is allocated. */
int hd_decode(lua_State *L, const char *p, size_t len, int flags);

#endif
