-- spec/support/wire.lua: the wire format's bytes written from Lua, for the
-- specs and seed generators that play a hostile worker (src/common/wire.h,
-- src/common/codec_int.h say what they mean).
local ffi = require("ffi")
local char, floor, concat = string.char, math.floor, table.concat

local M = {}

-- Frame types, reply statuses, value tags.
M.JOB, M.REPLY, M.REPLY_LAST, M.HELLO = 1, 2, 3, 4
M.OK, M.ERROR, M.OOM, M.BADRESULT = 0, 1, 2, 3
M.T_NIL, M.T_FALSE, M.T_TRUE, M.T_NUM, M.T_STR, M.T_TABLE, M.T_TABLE_MT, M.T_END, M.T_REF,
  M.T_FUNC, M.T_UPJOIN, M.T_MOD, M.T_FIELD, M.T_NULL = 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13
M.T_ARRAY, M.T_ARRAY_MT, M.T_KEYS, M.T_INT, M.T_KSET, M.T_KREF = 14, 15, 16, 17, 18, 19

function M.u32(n)
  return char(n % 256, floor(n / 256) % 256, floor(n / 65536) % 256, floor(n / 16777216) % 256)
end

function M.u64(n)
  return M.u32(n % 2^32) .. M.u32(floor(n / 2^32))
end

-- An unsigned LEB128 varint.
function M.uv(n)
  local out = {}
  repeat
    local b = n % 128
    n = floor(n / 128)
    out[#out + 1] = char(n > 0 and b + 128 or b)
  until n == 0
  return concat(out)
end

-- A double's eight bytes, as NUM carries them (the encoder sends integers
-- as INT instead). The wire is little-endian, as are the hosts the specs
-- run on.
function M.num(x)
  return ffi.string(ffi.new("double[1]", x), 8)
end

function M.str(s)
  return char(M.T_STR) .. M.uv(#s) .. s
end

function M.frame(kind, id, body)
  return M.u32(#body) .. char(kind) .. M.u64(id) .. body
end

function M.reply(id, status, msg, kind)
  return M.frame(kind or M.REPLY, id, char(status) .. msg)
end

return M
