-- make_seeds.lua: writes the fuzzers' seed corpora, fuzz/seeds/decode/ and
-- fuzz/seeds/frame/: messages handler.core's encoder makes for a table of
-- values, the hostile cases spec/hostile_spec.lua throws at a live host, and
-- frame streams around both. Deterministic; run from the checkout:
--   LUA_CPATH="build/?.so;;" luajit fuzz/make_seeds.lua
local core = require("handler.core")

local char, rep, floor, format = string.char, string.rep, math.floor, string.format
local encode = core.encode

local dir = arg and arg[1] or "fuzz/seeds"

---------------------------------------------------------------------------
-- Wire helpers (src/common/wire.h, src/common/codec_int.h).

-- The bytes of the wire format, shared with the specs that play a hostile
-- worker (run from the checkout, so spec/ is on the default package.path).
local W = require("spec.support.wire")
local u32, u64, uv = W.u32, W.u64, W.uv

-- A double's eight bytes, as NUM carries them.
local num = W.num

local T_NIL, T_FALSE, T_TRUE, T_NUM, T_STR, T_TABLE, T_TABLE_MT, T_END, T_REF, T_FUNC,
  T_UPJOIN, T_MOD, T_FIELD, T_NULL = 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13
local T_ARRAY, T_ARRAY_MT, T_KEYS, T_INT, T_KSET, T_KREF =
  W.T_ARRAY, W.T_ARRAY_MT, W.T_KEYS, W.T_INT, W.T_KSET, W.T_KREF

local str = W.str

---------------------------------------------------------------------------
-- Valid messages, table-driven.

local shared = { "shared" }
local cyclic = { name = "cycle" }
cyclic.self = cyclic
local deep = {}
do
  local t = deep
  for _ = 1, 150 do
    t.next = {}
    t = t.next
  end
end
-- The NULL light userdata (cjson.null), as the decoder makes it.
local NULL = core.decode(uv(1) .. char(T_NULL))
local wide = {}
for i = 1, 300 do wide[i] = i * 1.5 end
for i = 1, 100 do wide["k" .. i] = i % 3 == 0 end

local valid = {
  { "nil", nil },
  { "true", true },
  { "false", false },
  { "zero", 0 },
  { "negzero", -0.0 },
  { "inf", 1 / 0 },
  { "neginf", -1 / 0 },
  { "nan", 0 / 0 },
  { "big", 2^53 + 2 },
  { "frac", -1.5 },
  { "empty_string", "" },
  { "hi", "hi" },
  { "binary_string", "\0\1\2\255\n\"" },
  { "long_string", rep("x", 300) },
  { "empty_table", {} },
  { "array", { 1, 2, 3, "four", true } },
  { "nested", { a = 1, b = { c = { d = {} } } } },
  { "odd_keys", { [1.5] = 1, [true] = 2, [false] = "f", [-0.0] = 0, [2^60] = 3 } },
  { "table_key", { [{ 1 }] = "v", [shared] = shared } },
  { "shared_refs", { shared, shared, { shared } } },
  { "cycle", cyclic },
  { "metatable", setmetatable({ 1 }, { __index = { x = 1 }, __mode = "k" }) },
  { "shared_metatable", { setmetatable({}, shared), setmetatable({}, shared) } },
  { "deep", deep },
  { "wide", wide },
  { "module", string },
  { "field", string.format },
  { "field_number", math.pi },
  { "userdata_field", io.stdout },
  { "globals", _G },
  { "in_table", { f = string.format, m = math, t = table.concat } },
  { "null", NULL },
  { "null_in_table", { NULL, [NULL] = NULL } },
  { "integers", { 0, 1, -1, 2^53, -2^53, 2^53 + 2, 0.5, -0.0, 1e300 } },
  { "records", (function()
    local t = {}
    for i = 1, 40 do t[i] = { id = i, name = "x" .. i, tags = { "a", "b" } } end
    return t
  end)() },
  { "array_then_keys", { 1, 2, 3, x = 1, y = { 4, 5, z = 6 } } },
  { "array_with_hole", { 1, 2, nil, 4 } },
  { "array_metatable", setmetatable({ 1, 2 }, { __index = { k = "v" } }) },
}

local seeds = { decode = {}, frame = {} }

local function add(kind, name, bytes)
  seeds[kind][#seeds[kind] + 1] = { name, bytes }
end

for _, case in ipairs(valid) do
  add("decode", "valid_" .. case[1], encode(case[2]))
end
add("decode", "valid_none", encode())
add("decode", "valid_three", encode(1, nil, "x"))
add("decode", "valid_hundred", encode(unpack(wide, 1, 100)))
add("decode", "valid_mixed", encode("a", { 1, { 2, { 3 } } }, nil, false, string.rep))

---------------------------------------------------------------------------
-- Hostile messages.

-- n tables, each the value of key "k" in the one before.
local function nest(n, open)
  return uv(1) .. open .. rep(char(T_STR) .. uv(1) .. "k" .. open, n - 1)
end

local hostile = {
  { "empty", "" },
  { "count_huge", uv(2^63) },
  { "count_over_max", uv(8001) .. rep(char(T_NIL), 8001) },
  { "count_truncated", uv(5) .. char(T_NIL) },
  { "varint_eleven_bytes", rep("\255", 10) .. "\1" },
  { "varint_tenth_byte", rep("\255", 9) .. "\2" },
  { "string_absurd_length", uv(1) .. char(T_STR) .. uv(2^63) .. "abc" },
  { "string_u32_max", uv(1) .. char(T_STR) .. uv(2^32 - 1) .. "abc" },
  { "string_truncated", uv(1) .. char(T_STR) .. uv(10) .. "abc" },
  { "number_truncated", uv(1) .. char(T_NUM) .. "\0\0\0" },
  { "trailing_bytes", encode("hi") .. "garbage" },
  { "nest_deep", nest(300, char(T_TABLE, 0, 1)) },
  { "nest_deep_closed", nest(201, char(T_TABLE, 0, 1)) .. rep(char(T_END), 201) },
  { "nest_ok_200", nest(200, char(T_TABLE, 0, 1)) .. rep(char(T_END), 200) },
  { "nest_metatables", uv(1) .. rep(char(T_TABLE_MT, 0, 0, T_END), 300) },
  { "hints_ten_million", uv(1) .. char(T_TABLE) .. uv(1e7) .. uv(1e7) .. str("x") ..
    char(T_NUM) .. num(1) .. char(T_END) },
  { "hints_max", uv(1) .. char(T_TABLE) .. uv(2^63) .. uv(2^63) .. char(T_END) },
  { "hints_truncated", uv(1) .. char(T_TABLE) .. uv(1e7) .. uv(1e7) .. str("x") },
  { "nan_key", uv(1) .. char(T_TABLE, 0, 1, T_NUM) .. num(0 / 0) .. char(T_TRUE, T_END) },
  { "nil_key", uv(1) .. char(T_TABLE, 0, 1, T_NIL, T_TRUE, T_END) },
  { "missing_value", uv(1) .. char(T_TABLE, 0, 1) .. str("k") .. char(T_END) },
  { "metatable_not_table", uv(1) .. char(T_TABLE_MT, 0, 0, T_END) .. str("mt") },
  { "metatable_named", uv(1) .. char(T_TABLE_MT, 0, 0, T_END, T_MOD) .. uv(6) .. "string" },
  { "unknown_tag_20", uv(1) .. char(20) },
  { "array_truncated", uv(1) .. char(T_ARRAY, 0, 0, T_TRUE) },
  { "array_keys_twice", uv(1) .. char(T_ARRAY, 0, 0, T_TRUE, T_KEYS, T_KEYS, T_TRUE, T_END) },
  { "array_nil_item", uv(1) .. char(T_ARRAY, 0, 0, T_NIL, T_TRUE, T_END) },
  { "array_hint_huge", uv(1) .. char(T_ARRAY) .. uv(2^63) .. uv(2^63) .. rep(char(T_TRUE), 64) .. char(T_END) },
  { "array_mt_named", uv(1) .. char(T_ARRAY_MT, 0, 0, T_END, T_MOD) .. uv(6) .. "string" },
  { "keys_top", uv(1) .. char(T_KEYS) },
  { "keys_in_table", uv(1) .. char(T_TABLE, 0, 0, T_KEYS, T_TRUE, T_END) },
  { "int_truncated", uv(1) .. char(T_INT, 128) },
  { "int_huge", uv(1) .. char(T_INT) .. rep("\255", 9) .. "\1" },
  { "kref_unset", uv(1) .. char(T_KREF, 3) },
  { "kref_slot_huge", uv(2) .. char(T_KSET, 0, 1) .. "a" .. char(T_KREF, 200) },
  { "kset_slot_64", uv(1) .. char(T_KSET, 64, 1) .. "a" },
  { "kset_truncated", uv(1) .. char(T_KSET, 0) .. uv(9) .. "abc" },
  { "kset_as_key", uv(1) .. char(T_TABLE, 0, 0, T_KSET, 5, 1) .. "k" .. char(T_KREF, 5, T_END) },
  { "unknown_tag_255", uv(1) .. char(255) },
  { "end_tag", uv(1) .. char(T_END) },
  { "upjoin_tag", uv(1) .. char(T_UPJOIN, 0, 1) },
  { "ref_forward", uv(1) .. char(T_REF, 0) },
  { "ref_huge", uv(2) .. char(T_TABLE, 0, 0, T_END, T_REF) .. uv(2^40) },
  { "ref_self", uv(1) .. char(T_TABLE, 0, 1) .. str("me") .. char(T_REF, 0, T_END) },
  { "function", encode(function() return os.exit(7) end) },
  { "function_in_table", encode({ f = function() end }) },
  { "function_source", uv(1) .. char(T_FUNC) .. uv(13) .. "os.exit(7)   " .. uv(0) },
  { "module_unknown", uv(1) .. char(T_MOD) .. uv(4) .. "evil" },
  { "module_truncated", uv(1) .. char(T_MOD) .. uv(40) .. "str" },
  { "field_unknown", uv(1) .. char(T_FIELD) .. uv(6) .. "string" .. uv(4) .. "nope" },
  { "field_of_function", uv(1) .. char(T_FIELD) .. uv(5) .. "print" .. uv(1) .. "x" },
  { "field_loaded", uv(1) .. char(T_FIELD) .. uv(7) .. "package" .. uv(6) .. "loaded" },
  { "field_globals", uv(1) .. char(T_FIELD) .. uv(2) .. "_G" .. uv(2) .. "_G" },
  { "field_c_function", uv(1) .. char(T_FIELD) .. uv(5) .. "debug" .. uv(11) .. "getregistry" },
}
for _, case in ipairs(hostile) do add("decode", "hostile_" .. case[1], case[2]) end

---------------------------------------------------------------------------
-- Frame streams: three option bytes (see fuzz_frame.c), then what the
-- worker writes. Job ids are 1 and 2.

local REPLY, LAST, HELLO = 2, 3, 4

local frame, reply = W.frame, W.reply

local ok_hi = reply(1, 0, encode("hi"))
local streams = {
  { "ok", ok_hi },
  { "ok_last", reply(1, 0, encode("hi"), LAST) },
  { "error", reply(1, 1, encode("boom", "traceback")) },
  { "oom", reply(1, 2, uv(0)) },
  { "badresult", reply(1, 3, encode("cannot travel")) },
  { "status_unknown", reply(1, 9, encode("hi")) },
  { "wrong_id", reply(1000, 0, encode("hi")) },
  { "type_unknown", frame(9, 1, char(0) .. encode("hi")) },
  { "stats_then_ok", frame(6, 1, u64(123456) .. u64(4096) .. u64(200000)) .. ok_hi },
  { "stats_twice", frame(6, 1, u64(1) .. u64(2) .. u64(3))
    .. frame(6, 1, u64(1) .. u64(2) .. u64(3)) .. ok_hi },
  { "stats_short", frame(6, 1, u64(1)) .. ok_hi },
  { "events_then_ok", frame(7, 1, encode({ step = 1 })) .. frame(7, 1, encode("two")) .. ok_hi },
  { "event_wrong_id", frame(7, 2, encode("x")) .. ok_hi },
  { "event_bad_message", frame(7, 1, uv(1) .. char(200)) .. ok_hi },
  { "type_job", frame(1, 1, char(0) .. encode("hi")) },
  { "empty_body", frame(REPLY, 1, "") },
  { "length_u32_max", u32(2^32 - 1) .. char(REPLY) .. u64(1) .. char(0) .. encode("hi") },
  { "length_over_limit", u32(2^20 + 10) .. char(REPLY) .. u64(1) .. char(0) .. rep("x", 100) },
  { "truncated", u32(100) .. char(REPLY) .. u64(1) .. char(0) .. encode("hi") },
  { "short_header", char(5, 0, 0) },
  { "trailing_garbage", ok_hi .. "garbage" },
  { "trailing_short", ok_hi .. "\1" },
  { "two_replies", ok_hi .. ok_hi },
  { "two_jobs", ok_hi .. reply(2, 0, encode("second")) },
  { "bad_message", reply(1, 0, uv(1) .. char(T_FUNC) .. uv(3) .. "\27LJ" .. uv(0)) },
  { "bad_error_message", reply(1, 1, uv(1) .. char(13)) },
  { "nested_reply", reply(1, 0, nest(300, char(T_TABLE, 0, 1))) },
  { "big_reply", reply(1, 0, encode(rep("y", 6000))) },
  { "hello_then_ok", frame(HELLO, 0, u32(4242)) .. ok_hi },
  { "hello_twice", frame(HELLO, 0, u32(4242)) .. frame(HELLO, 0, u32(4242)) .. ok_hi },
  { "hello_bad_length", frame(HELLO, 0, u32(4242) .. "x") .. ok_hi },
  { "hello_after_reply", ok_hi .. frame(HELLO, 0, u32(4242)) },
  { "ok_then_junk", ok_hi .. "junk" },
  { "ok_then_second_job", ok_hi .. reply(2, 0, encode("second")) },
  { "ok_null", reply(1, 0, encode(NULL, { NULL })) },
}
-- Option bytes: a few mixes of chunking, ordering and exits for each.
local options = {
  { 0, 0, 0 },        -- all at once, run the loop, exit 0
  { 1, 7, 0 },        -- 1-16 byte chunks
  { 0x18, 0, 2 },     -- EOF and exit report at once, SIGKILL
  { 0x40, 0, 0 },     -- a second job after the first
  { 0x20 + 2, 3, 1 }, -- small max_result, 1-512 byte chunks, exit 3
  { 0x80, 0, 4 },     -- deadline at once, the frame never read
  { 1, 9, 8 },        -- 1-16 byte chunks, the user kills the job after two
  { 1, 11, 16 },      -- 1-16 byte chunks, the worker dies after two
  { 0x40, 0, 32 },    -- a second job, late: the idle worker's bytes unread
  { 0x48, 0, 32 },    -- the same, and the worker's end closed
}
-- An idle worker's bytes or EOF waiting when the next job comes.
add("frame", "late_junk", char(0x40, 0, 32) .. ok_hi .. "junk")
add("frame", "late_frame", char(0x40, 0, 32) .. ok_hi .. reply(2, 0, encode("early")))
add("frame", "late_eof", char(0x48, 0, 32) .. ok_hi)
add("frame", "late_eof_junk", char(0x48, 0, 32) .. ok_hi .. "junk")
-- Job 1 of three items (byte 2, bit 6): a reply per item.
add("frame", "items_three", char(0, 0, 0x40) .. ok_hi .. reply(1, 1, encode("boom", "tb"))
  .. reply(1, 0, encode("third")))
add("frame", "items_stats", char(1, 5, 0x40) .. frame(6, 1, u64(7) .. u64(8) .. u64(9)) .. ok_hi
  .. frame(6, 1, u64(9) .. u64(10)) .. ok_hi .. ok_hi)
add("frame", "items_last_early", char(0, 0, 0x40) .. ok_hi .. reply(1, 0, encode("x"), LAST))
add("frame", "items_one_more", char(0, 0, 0x40) .. ok_hi .. ok_hi .. ok_hi .. ok_hi)
add("frame", "items_then_die", char(1, 3, 0x40 + 16) .. ok_hi .. ok_hi)
add("frame", "items_deadline", char(0x80, 0, 0x40) .. ok_hi)
add("frame", "items_wrong_id", char(0, 0, 0x40) .. ok_hi .. reply(2, 0, encode("x")))
for i, case in ipairs(streams) do
  local o = options[(i - 1) % #options + 1]
  add("frame", case[1], char(o[1], o[2], o[3]) .. case[2])
  add("frame", case[1] .. "_plain", char(0, 0, 0) .. case[2])
end

---------------------------------------------------------------------------

local function write(path, bytes)
  local f = assert(io.open(path, "wb"))
  f:write(bytes)
  f:close()
end

for kind, list in pairs(seeds) do
  os.execute(format("mkdir -p '%s/%s'", dir, kind))
  for _, s in ipairs(list) do write(format("%s/%s/%s", dir, kind, s[1]), s[2]) end
  print(format("%s/%s: %d seeds", dir, kind, #list))
end
