/* lcodec.h: the codec as Lua functions, core.encode, core.decode,
 * core.validate and core.refuse. */
#ifndef HD_LCODEC_H
#define HD_LCODEC_H

#include <lua.h>

/* encode(...) → string: a message holding all the arguments; Lua functions
 * travel as bytecode (HD_ENC_FUNCTIONS). */
int hd_l_encode(lua_State *L);

/* encode_job(fn, ...) → string: fn and its arguments, encoded as a job's
 * frame carries them (HD_ENC_HOST, HD_ENC_ARGS), for a job that another
 * host will run (handler.remote): that host passes the bytes to its worker
 * as they are (core.submit with a string for the function). */
int hd_l_encode_job(lua_State *L);

/* decode(s [, trusted [, nogc]]) → the values of message s. Without
 * `trusted` the bytes are treated as hostile: no bytecode, no require.
 * `nogc`: HD_DEC_NOGC, as a worker decodes its job. */
int hd_l_decode(lua_State *L);

/* validate(s) → true | false, msg: whether s would decode as a worker's
 * reply (hd_validate), with the decoder's message when it would not. */
int hd_l_validate(lua_State *L);

/* refuse(value, what|nil): a table, function or userdata that must not
 * travel in a job: sending it raises "handler: cannot send a <type>:
 * <where> is <what>" in the caller (hd_refuse); nil lifts the mark. */
int hd_l_refuse(lua_State *L);

#endif
