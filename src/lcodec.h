/* lcodec.h: the codec as Lua functions, core.encode and core.decode. */
#ifndef HD_LCODEC_H
#define HD_LCODEC_H

#include <lua.h>

/* encode(...) → string: a message holding all the arguments; Lua functions
 * travel as bytecode (HD_ENC_FUNCTIONS). */
int hd_l_encode(lua_State *L);

/* decode(s [, trusted]) → the values of message s. Without `trusted` the
 * bytes are treated as hostile: no bytecode, no require. */
int hd_l_decode(lua_State *L);

#endif
