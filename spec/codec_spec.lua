-- codec_spec.lua: the value codec (src/common/codec.c) through core.encode and
-- core.decode: round trips, the wire format, what cannot travel and why, and
-- hostile bytes that must be refused cleanly.
local core = require("handler.core")

local encode, decode, validate = core.encode, core.decode, core.validate
local byte, char, rep = string.byte, string.char, string.rep
local floor = math.floor

-- An unsigned LEB128 varint, for building messages by hand.
local function uv(n)
  local out = {}
  repeat
    local b = n % 128
    n = floor(n / 128)
    if n > 0 then b = b + 128 end
    out[#out + 1] = char(b)
  until n == 0
  return table.concat(out)
end

-- The eight little-endian bytes of a double, without string.pack (LuaJIT).
local ffi = require("ffi")
local function num_bytes(x)
  local d = ffi.new("double[1]", x)
  return ffi.string(d, 8)
end

-- The n-th message of a random run (math.random, seeded by the caller):
-- random bytes for even n, mostly small tags and varints so the decoder gets
-- past byte one; for odd n, one of `seeds` with one to four bytes changed,
-- removed or inserted.
local function random_message(n, seeds)
  local random = math.random
  if n % 2 == 0 then
    local parts = {}
    for i = 1, random(0, 40) do parts[i] = char(random(0, 255)) end
    if #parts > 0 then parts[1] = char(random(0, 4)) end
    for i = 2, #parts do
      if random() < 0.6 then parts[i] = char(random(0, 13)) end
    end
    return table.concat(parts)
  end
  local seed = seeds[random(#seeds)]
  local b = { byte(seed, 1, -1) }
  for _ = 1, random(1, 4) do
    local pos = random(#b)
    local r = random()
    if r < 0.4 then b[pos] = random(0, 255)
    elseif r < 0.7 then table.remove(b, pos)
    else table.insert(b, pos, random(0, 13)) end
  end
  return char(unpack(b))
end

-- Calls fn with each of the 20,000 messages of a random run seeded with
-- `randomseed`, mutating two encoded messages and those of `extra`.
local function each_random_message(randomseed, extra, fn)
  math.randomseed(randomseed)
  local seeds = {
    encode({ 1, "two", { x = 3 }, string.format }),
    encode(setmetatable({ a = { b = {} } }, { __index = {} }), "x", true, 1.5),
  }
  for _, m in ipairs(extra) do seeds[#seeds + 1] = m end
  for n = 1, 20000 do fn(random_message(n, seeds)) end
end

-- Round trips through the trusted decoder (the worker's side).
local function rt(...)
  return decode(encode(...), true)
end

-- Round trips data through the hostile decoder (the parent's side).
local function rt_hostile(...)
  return decode(encode(...))
end

-- Deep comparison that treats NaN as equal to NaN, tells -0 from 0, and
-- follows cycles by pairing tables as it goes.
local function same(a, b, seen)
  seen = seen or {}
  if type(a) ~= type(b) then return false end
  if type(a) == "number" then
    if a ~= a then return b ~= b end
    if a == 0 and b == 0 then return 1 / a == 1 / b end
    return a == b
  end
  if type(a) ~= "table" then return a == b end
  if seen[a] then return seen[a] == b end
  seen[a] = b
  -- Table keys cannot be looked up across copies; their own cases check them.
  for k, v in pairs(a) do
    if type(k) ~= "table" and not same(v, rawget(b, k), seen) then return false end
  end
  for k in pairs(b) do
    if type(k) ~= "table" and rawget(a, k) == nil then return false end
  end
  local ma, mb = getmetatable(a), getmetatable(b)
  if (ma == nil) ~= (mb == nil) then return false end
  if ma then return same(ma, mb, seen) end
  return true
end

local function all_bytes()
  local t = {}
  for i = 0, 255 do t[#t + 1] = char(i) end
  return table.concat(t)
end

-- Expects fn(...) to raise a string containing `needle` (plain text).
local function raises(needle, fn, ...)
  local ok, err = pcall(fn, ...)
  assert.is_false(ok, "expected an error containing: " .. needle)
  assert.is_string(err)
  if not err:find(needle, 1, true) then
    error(("error %q does not contain %q"):format(err, needle), 2)
  end
  return err
end

-- A NAMED record: package.loaded[mod] or package.loaded[mod][field].
local function named(mod, field)
  if field then return "\12" .. uv(#mod) .. mod .. uv(#field) .. field end
  return "\11" .. uv(#mod) .. mod
end

local function where(f)
  local info = debug.getinfo(f, "S")
  return info.short_src .. ":" .. info.linedefined
end

-- Values that travel both ways, by name and value.
local data_cases = {
  { "nil", nil },
  { "true", true },
  { "false", false },
  { "zero", 0 },
  { "one", 1 },
  { "negative", -1.5 },
  { "pi", math.pi },
  { "2^53", 2 ^ 53 },
  { "2^53 + 2", 2 ^ 53 + 2 },
  { "-2^63", -2 ^ 63 },
  { "huge", 1.7976931348623157e308 },
  { "smallest normal", 2.2250738585072014e-308 },
  { "largest denormal", 2.2250738585072009e-308 },
  { "smallest denormal", 4.9406564584124654e-324 },
  { "inf", math.huge },
  { "-inf", -math.huge },
  { "empty string", "" },
  { "string", "hello" },
  { "string with zeros", "a\0b\0\0c" },
  { "all 256 bytes", all_bytes() },
  { "empty table", {} },
  { "array", { 1, 2, 3, "four", true, false } },
  { "hash", { a = 1, b = "two", c = true } },
  { "mixed", { 1, 2, 3, x = "y", [10] = 10, [-1] = -1, [1.5] = 1.5 } },
  { "sparse", { [1] = 1, [1000000] = 2 } },
  { "boolean keys", { [true] = "t", [false] = "f" } },
  { "nested", { a = { b = { c = { d = { "deep" } } } } } },
  { "binary keys", { ["\0"] = 1, [all_bytes()] = 2 } },
  { "metatable", setmetatable({ 1 }, { kind = "mt", nested = { 1, 2 } }) },
}

describe("codec round trips", function()
  for _, case in ipairs(data_cases) do
    local name, value = case[1], case[2]
    it("carries " .. name .. " (trusted and hostile)", function()
      assert.is_true(same(value, (rt(value))))
      assert.is_true(same(value, (rt_hostile(value))))
    end)
  end

  it("keeps -0.0 negative", function()
    local x = rt_hostile(-0.0)
    assert.equals(0, x)
    assert.equals(-math.huge, 1 / x)
  end)

  it("keeps NaN a NaN", function()
    local x = rt_hostile(0 / 0)
    assert.is_true(x ~= x)
  end)

  it("carries a 1 MB string", function()
    local s = rep("0123456789abcdef", 65536)
    assert.equals(s, (rt_hostile(s)))
  end)

  it("carries a large array", function()
    local t = {}
    for i = 1, 100000 do t[i] = i * 0.5 end
    local u = rt_hostile(t)
    assert.equals(100000, #u)
    for i = 1, 100000 do assert(u[i] == i * 0.5) end
  end)

  -- Array parts and records are read and written in place: every kind of
  -- value among numbers, a t[0] before the items, a gap, keys after items,
  -- records whose keys are known already and ones that have another key.
  it("carries arrays and records read in place, whatever they hold", function()
    local mixed = { 1, 2.5, "three", true, { 5 }, -0.0, 0 / 0, 2 ^ 53, -2 ^ 60 }
    local zero = { [0] = "zero", 1, 2, 3 }
    local gap = { 1, 2, nil, 4, k = "v" }
    local list = {}
    for i = 1, 300 do
      list[i] = { id = i, name = "x" .. i, ratio = i / 7 }
      if i % 50 == 0 then list[i][0] = "a zero key" end
      if i % 70 == 0 then list[i].extra = { i } end
      if i % 90 == 0 then list[i][1] = "an item" end
    end
    for _, v in ipairs({ mixed, zero, gap, list, { zero, gap, mixed } }) do
      assert.is_true(same(v, (rt(v))))
      assert.is_true(same(v, (rt_hostile(v))))
    end
    -- Two bytes an item: the decoder's budget for size hints (4 bytes a
    -- byte of message) falls just short of the array part, so the last
    -- items go in through the API.
    local big = {}
    for i = 1, 20000 do big[i] = i % 50 end
    local msg = encode(big)
    assert.is_true(same(big, (decode(msg))))
  end)

  it("keeps shared references shared", function()
    local shared = { 1 }
    local u = rt_hostile({ a = shared, b = shared, c = { shared } })
    assert.equals(u.a, u.b)
    assert.equals(u.a, u.c[1])
    assert.same({ 1 }, u.a)
  end)

  it("keeps cycles", function()
    local t = { name = "t" }
    t.self = t
    t.child = { parent = t }
    local u = rt_hostile(t)
    assert.equals(u, u.self)
    assert.equals(u, u.child.parent)
    assert.equals("t", u.name)
  end)

  it("carries tables as keys, shared with values", function()
    local k = { "key" }
    local u = rt_hostile({ [k] = k })
    local key, value = next(u)
    assert.equals(key, value)
    assert.same({ "key" }, key)
  end)

  it("carries metatables, shared and cyclic", function()
    local mt = { tag = "mt" }
    mt.__index = mt
    local a, b = setmetatable({}, mt), setmetatable({}, mt)
    local u = rt_hostile({ a, b })
    local umt = getmetatable(u[1])
    assert.equals(umt, getmetatable(u[2]))
    assert.equals(umt, umt.__index)
    assert.equals("mt", u[1].tag)
  end)

  it("reads and writes tables raw, calling no metamethods", function()
    local calls = 0
    local mt = {
      __index = function() calls = calls + 1 end,
      __newindex = function() calls = calls + 1 end,
      __pairs = function() calls = calls + 1 end,
      __len = function() calls = calls + 1; return 0 end,
    }
    local t = setmetatable({ 1, 2, x = 3 }, mt)
    local u = rt(t)
    assert.equals(0, calls)
    assert.equals(3, rawget(u, "x"))
    assert.equals(2, rawget(u, 2))
    assert.equals(0, calls)
  end)

  it("keeps the number of values, nils included", function()
    assert.equals(0, select("#", rt()))
    assert.equals(1, select("#", rt(nil)))
    assert.equals(5, select("#", rt(nil, 1, nil, nil, 2)))
    local a, b, c, d, e = rt_hostile(nil, 1, nil, nil, 2)
    assert.is_nil(a); assert.equals(1, b); assert.is_nil(c); assert.is_nil(d)
    assert.equals(2, e)
  end)

  it("carries 7000 values", function()
    local t = {}
    for i = 1, 7000 do t[i] = i end
    local s = encode(unpack(t))
    assert.equals(7000, select("#", decode(s)))
  end)

  it("carries tables nested 200 deep but not 201", function()
    local function nest(n)
      local t = {}
      for _ = 2, n do t = { t } end
      return t
    end
    local u = rt_hostile(nest(200))
    local depth = 0
    while u do depth = depth + 1; u = u[1] end
    assert.equals(200, depth)
    local err = raises("handler: cannot send a table nested deeper than 200 levels: value #1 -> [1]",
      encode, nest(201))
    assert.equals(("[1]"):rep(200), err:match("value #1 %-> (.*)$"))
  end)
end)

describe("codec functions", function()
  it("carries a closure with upvalues", function()
    local n, s, t = 41, "str", { k = "v" }
    local f = rt(function(x) return n + x, s, t.k end)
    local a, b, c = f(1)
    assert.equals(42, a)
    assert.equals("str", b)
    assert.equals("v", c)
  end)

  it("carries a recursive local function", function()
    local function fact(k) return k <= 1 and 1 or k * fact(k - 1) end
    local g = rt(fact)
    assert.equals(3628800, g(10))
    assert.are_not.equal(fact, g)
  end)

  it("keeps an upvalue shared between closures", function()
    local count = 0
    local function inc() count = count + 1 end
    local function get() return count end
    local u = rt({ inc = inc, get = get })
    u.inc()
    u.inc()
    assert.equals(2, u.get())
    assert.equals(0, count)
  end)

  it("keeps an upvalue shared with a closure inside the upvalue's own value", function()
    local state = { n = 0 }
    local reader
    local function bump() state.n = state.n + 1; return reader end
    reader = function() return state.n end
    state.bump = bump
    local f = rt(function() return state end)
    local st = f()
    local r = st.bump()
    assert.equals(1, r())
    st.bump()
    assert.equals(2, r())
  end)

  it("shares upvalues across three closures made by one factory", function()
    local function counter()
      local n = 0
      return function() n = n + 1 end, function() return n end,
        function(v) n = v end
    end
    local inc, get, set = counter()
    local u = rt({ inc, get, set })
    u[3](10)
    u[1]()
    assert.equals(11, u[2]())
  end)

  it("carries functions that call each other", function()
    local even, odd
    function even(n) if n == 0 then return true end return odd(n - 1) end
    function odd(n) if n == 0 then return false end return even(n - 1) end
    local e = rt(even)
    assert.is_true(e(10))
    assert.is_false(e(7))
  end)

  it("sends upvalues that are library values by name", function()
    local fmt, str = string.format, string
    local f = rt(function() return fmt, str end)
    local a, b = f()
    assert.equals(string.format, a)
    assert.equals(string, b)
  end)

  it("keeps debug info for tracebacks", function()
    local function boom() error("boom") end
    local g = rt(boom)
    local ok, err = pcall(g)
    assert.is_false(ok)
    assert.truthy(err:find("codec_spec.lua:%d+: boom"))
  end)

  it("runs a function's body only when called", function()
    local ran = false
    local f = function() ran = true end
    local g = rt(f)
    assert.is_false(ran)
    assert.equals("function", type(g))
  end)
end)

describe("codec names", function()
  it("sends library functions and tables by name", function()
    assert.equals(string.format, rt_hostile(string.format))
    assert.equals(string, rt_hostile(string))
    assert.equals(io.stdout, rt_hostile(io.stdout))
    assert.equals(print, rt_hostile(print))
    assert.equals(_G, rt_hostile(_G))
    assert.equals(package.loaded, rt_hostile(package.loaded))
    assert.equals(ffi, rt_hostile(ffi))
    assert.equals(ffi.C, rt_hostile(ffi.C))
  end)

  it("writes names in the documented format", function()
    assert.equals("\1\11\6string", encode(string))
    assert.equals("\1\12\6string\6format", encode(string.format))
    assert.equals("\1\12\2io\6stdout", encode(io.stdout))
    assert.equals("\1\12\2_G\5print", encode(print))
    assert.equals("\1" .. named("string", "format"), encode(string.format))
  end)

  it("names values of modules loaded after the first message", function()
    local mod = { fn = function() return 1 end, tbl = {} }
    encode(string.format)
    package.loaded.hd_codec_test_mod = mod
    finally(function() package.loaded.hd_codec_test_mod = nil end)
    assert.equals(mod, rt_hostile(mod))
    assert.equals(mod.fn, rt_hostile(mod.fn))
    assert.equals(mod.tbl, rt_hostile(mod.tbl))
    assert.equals("\1" .. named("hd_codec_test_mod", "fn"), encode(mod.fn))
  end)

  it("forgets a module that was unloaded", function()
    local mod = { 1 }
    package.loaded.hd_codec_test_gone = mod
    assert.equals("\1" .. named("hd_codec_test_gone"), encode(mod))
    package.loaded.hd_codec_test_gone = nil
    assert.same({ 1 }, decode(encode(mod)))
    assert.are_not.equal(mod, decode(encode(mod)))
  end)

  it("notices one module unloaded and another loaded between messages", function()
    local a, b = { "a" }, { "b" }
    package.loaded.hd_codec_test_a = a
    assert.equals("\1" .. named("hd_codec_test_a"), encode(a))
    package.loaded.hd_codec_test_a = nil
    package.loaded.hd_codec_test_b = b
    finally(function() package.loaded.hd_codec_test_b = nil end)
    assert.equals("\1" .. named("hd_codec_test_b"), encode(b))
    assert.same({ "a" }, decode(encode(a)))
  end)

  it("prefers a module's own name to a field name", function()
    local sub = { "sub" }
    package.loaded.hd_codec_test_outer = { sub = sub }
    finally(function()
      package.loaded.hd_codec_test_outer = nil
      package.loaded.hd_codec_test_sub = nil
    end)
    assert.equals("\1" .. named("hd_codec_test_outer", "sub"), encode(sub))
    package.loaded.hd_codec_test_sub = sub
    assert.equals("\1" .. named("hd_codec_test_sub"), encode(sub))
    assert.equals(sub, rt_hostile(sub))
  end)

  it("finds a C function added to a module since the names were gathered", function()
    encode(string.format) -- gathers names
    local cfn = coroutine.wrap(function() end)
    string.hd_codec_test_cfn = cfn
    finally(function() string.hd_codec_test_cfn = nil end)
    assert.equals(cfn, rt_hostile(cfn))
  end)

  it("sends a script's global Lua functions and tables by value", function()
    -- They exist on the sending side only; only the globals table's C
    -- functions and userdata are looked up by name.
    _G.hd_codec_test_fn = function() return 42 end
    _G.hd_codec_test_tbl = { 1, 2 }
    finally(function() _G.hd_codec_test_fn, _G.hd_codec_test_tbl = nil, nil end)
    package.loaded.hd_codec_force_rebuild = true
    finally(function() package.loaded.hd_codec_force_rebuild = nil end)
    local f = rt(hd_codec_test_fn)
    assert.are_not.equal(hd_codec_test_fn, f)
    assert.equals(42, f())
    local t = rt_hostile(hd_codec_test_tbl)
    assert.are_not.equal(hd_codec_test_tbl, t)
    assert.same({ 1, 2 }, t)
  end)

  it("requires a missing module only when trusted", function()
    local loads = 0
    package.preload.hd_codec_test_preload = function()
      loads = loads + 1
      return { answer = 42 }
    end
    finally(function()
      package.preload.hd_codec_test_preload = nil
      package.loaded.hd_codec_test_preload = nil
    end)
    local msg = "\1" .. named("hd_codec_test_preload", "answer")
    raises('handler: bad message: no module in package.loaded named "hd_codec_test_preload"',
      decode, msg)
    assert.equals(0, loads)
    assert.equals(42, decode(msg, true))
    assert.equals(1, loads)
    assert.equals(42, decode(msg))
  end)

  it("names the module a trusted require fails on", function()
    raises('handler: cannot load module "hd_codec_no_such_module": ',
      decode, "\1" .. named("hd_codec_no_such_module"), true)
  end)
end)

describe("codec values that cannot travel", function()
  it("names the upvalue and the path of a userdata", function()
    local conn = { db = { handle = newproxy() } }
    local f = function() return conn end
    local ok, err = pcall(encode, f)
    assert.is_false(ok)
    assert.equals("handler: cannot send a userdata: upvalue 'conn' of function at "
      .. where(f) .. " -> .db.handle", err)
  end)

  it("names a chain of upvalues down to a coroutine", function()
    local co = coroutine.create(print)
    local inner = { 1, co }
    local g = function() return inner end
    local h = function() return g end
    local ok, err = pcall(encode, h)
    assert.is_false(ok)
    assert.equals("handler: cannot send a thread: upvalue 'g' of function at " .. where(h)
      .. " -> upvalue 'inner' of function at " .. where(g) .. " -> [2]", err)
  end)

  it("refuses an unnamed C function", function()
    local cb = coroutine.wrap(function() end)
    assert.is_true(debug.getinfo(cb, "S").what == "C")
    local ok, err = pcall(encode, { cb = cb })
    assert.is_false(ok)
    assert.equals("handler: cannot send a function (C function not found in package.loaded): "
      .. "value #1 -> .cb", err)
  end)

  it("names top-level values by position", function()
    local ok, err = pcall(encode, 1, 2, newproxy())
    assert.is_false(ok)
    assert.equals("handler: cannot send a userdata: value #3", err)
  end)

  it("refuses cdata", function()
    raises("handler: cannot send a cdata: value #1 -> .x", encode, { x = ffi.new("int", 1) })
  end)

  it("marks a key that cannot travel", function()
    raises("handler: cannot send a userdata: value #1 -> .t[userdata key](key)",
      encode, { t = { [newproxy()] = 1 } })
    raises("handler: cannot send a thread: value #1 -> [table key](key).co",
      encode, { [{ co = coroutine.create(print) }] = 1 })
  end)

  it("shows keys the way Lua code would", function()
    local u = newproxy()
    raises([==[value #1 -> ["two words"][3][true][-1.5]["end"]]==], encode,
      { ["two words"] = { [3] = { [true] = { [-1.5] = { ["end"] = u } } } } })
    raises('value #1 -> ["a\\"b\\\\c\\nd\\000"]', encode, { ['a"b\\c\nd\0'] = u })
    local long = rep("x", 100)
    raises('value #1 -> ["' .. rep("x", 40) .. '"...]', encode, { [long] = u })
  end)

  it("walks into metatables", function()
    raises("handler: cannot send a userdata: value #1 -> .obj(metatable).__index.x",
      encode, { obj = setmetatable({}, { __index = { x = newproxy() } }) })
  end)

  it("names stripped upvalues by number", function()
    -- A stripped function has lost its upvalue names.
    local src = "local up; return function() return up end"
    local g = loadstring(string.dump(loadstring(src)(), true))
    debug.setupvalue(g, 1, newproxy())
    raises("handler: cannot send a userdata: upvalue #1 of function at ", encode, g)
  end)

  it("leaves the stack balanced after an error", function()
    for _ = 1, 100 do pcall(encode, { 1, 2, { newproxy() } }) end
    assert.equals(3, rt({ 1, 2, 3 })[3])
  end)
end)

describe("codec NULL light userdata", function()
  -- The NULL light userdata (cjson.null, ngx.null) is the same value in
  -- every process: it travels as itself, both ways, named or not.
  local NULL = decode("\1\13")

  it("decodes its tag as the NULL light userdata", function()
    assert.equals("userdata", type(NULL))
    assert.equals("userdata: NULL", tostring(NULL))
    local ok, cjson = pcall(require, "cjson")
    if ok then assert.is_true(rawequal(cjson.null, NULL)) end
  end)

  it("writes it as its tag alone, whatever name it has", function()
    assert.equals("\1\13", encode(NULL))
    package.loaded.hd_codec_test_null = { null = NULL }
    finally(function() package.loaded.hd_codec_test_null = nil end)
    assert.equals("\1\13", encode(NULL))
    assert.equals("\1\14\129\128\0\128\128\0\13\7", encode({ NULL }))
  end)

  it("carries it as a value and as a key, trusted and hostile", function()
    for _, decoded in ipairs({ { rt(NULL, { NULL, [NULL] = "k" }) },
                               { rt_hostile(NULL, { NULL, [NULL] = "k" }) } }) do
      assert.is_true(rawequal(NULL, decoded[1]))
      assert.is_true(rawequal(NULL, decoded[2][1]))
      assert.equals("k", decoded[2][NULL])
    end
  end)

  it("is data to the validator", function()
    assert.is_true(validate("\1\13"))
    assert.is_true(validate("\1\5\0\1\13\13\7"))
  end)

  it("still refuses another light userdata that has no name", function()
    local light = debug.upvalueid(function() return NULL end, 1)
    assert.equals("userdata", type(light))
    raises("handler: cannot send a userdata: value #1 -> .x", encode, { x = light })
  end)
end)

describe("codec wire format", function()
  it("writes scalars as documented", function()
    assert.equals("\0", encode())
    assert.equals("\1\0", encode(nil))
    assert.equals("\2\2\1", encode(true, false))
    -- Integers (up to 2^53, not -0) as INT, a zigzag varint; other numbers
    -- as NUM, their eight bytes.
    assert.equals("\1\17\2", encode(1.0))
    assert.equals("\1\17\5", encode(-3))
    assert.equals("\1\17\0", encode(0))
    assert.equals("\1\17" .. uv(2 ^ 54), encode(2 ^ 53))
    assert.equals("\1\17" .. rep("\255", 7) .. "\31", encode(-2 ^ 53)) -- 2^54 - 1
    assert.equals("\1\3" .. num_bytes(2 ^ 53 + 2), encode(2 ^ 53 + 2))
    assert.equals("\1\3" .. num_bytes(1.5), encode(1.5))
    assert.equals("\1\3\0\0\0\0\0\0\0\128", encode(-0.0))
    assert.equals("\1\4\2ab", encode("ab"))
    assert.equals("\1\4\128\1" .. rep("x", 128), encode(rep("x", 128)))
  end)

  it("writes tables, refs and metatables as documented", function()
    -- Both size hints are three-byte varints, backpatched once counted.
    local h0, h1, h2 = "\128\128\0", "\129\128\0", "\130\128\0"
    assert.equals("\1\5" .. h0 .. h0 .. "\7", encode({}))
    -- t[1], t[2]... in turn are items of an ARRAY, without their keys.
    assert.equals("\1\14" .. h1 .. h0 .. "\4\1a\7", encode({ "a" }))
    local t = {}
    t[1] = t
    assert.equals("\1\14" .. h1 .. h0 .. "\8\0\7", encode(t))
    assert.equals("\1\6" .. h0 .. h0 .. "\7\5" .. h0 .. h0 .. "\7", encode(setmetatable({}, {})))
    assert.equals("\1\15" .. h1 .. h0 .. "\2\7\5" .. h0 .. h0 .. "\7",
      encode(setmetatable({ true }, {})))
  end)

  it("writes items, then KEYS and the keyed entries", function()
    local h0, h1, h2 = "\128\128\0", "\129\128\0", "\130\128\0"
    -- A key string goes once (KSET: its slot, length, bytes), then as a
    -- KREF of that slot; the slot depends on the string's address.
    local s = encode({ 10, 20, x = true })
    local slot = s:byte(15)
    assert.is_true(slot < 64)
    assert.equals("\1\14" .. h2 .. h1 .. "\17\20\17\40\16\18" .. char(slot) .. "\1x\2\7", s)
    local r = encode({ { x = 1 }, { x = 2 } })
    slot = r:byte(17)
    assert.equals("\1\14" .. h2 .. h0 ..
      "\5" .. h0 .. h1 .. "\18" .. char(slot) .. "\1x\17\2\7" ..
      "\5" .. h0 .. h1 .. "\19" .. char(slot) .. "\17\4\7\7", r)
    assert.same({ { x = 1 }, { x = 2 } }, decode(r))
  end)

  it("decodes KSET and KREF wherever a string goes", function()
    assert.same({ "ab", "ab", ab = "ab" },
      decode("\1\14\0\0\18\5\2ab\19\5\16\19\5\19\5\7"))
    assert.same({ "a", "b" }, { decode("\2\18\63\1a\18\63\1b") })
    assert.same({ "a", "a" }, { decode("\2\18\0\1a\19\0") })
  end)

  it("decodes items past a hint, and a KEYS marker with no keys after it", function()
    assert.same({ 1, 2, 3 }, decode("\1\14\1\0\17\2\17\4\17\6\7"))
    assert.same({ 1 }, decode("\1\14\0\0\17\2\16\7"))
    assert.same({ [1] = 1, [3] = 3 }, decode("\1\14\0\0\17\2\0\17\6\7"))
  end)

  it("decodes minimal varints too", function()
    assert.same({ "a" }, decode("\1\5\1\0\3" .. num_bytes(1) .. "\4\1a\7"))
  end)
end)

-- Hostile messages, each with (part of) the message the decoder refuses it
-- with. `named` marks the ones only a lookup in package.loaded can refuse
-- (hd_fnmod is set to a function while they run); core.validate, which
-- cannot look names up, accepts those.
local nan_key = "\1\5\0\0\3" .. num_bytes(0 / 0) .. "\2\7"
local hostile_cases = {
  { "empty input", "", "truncated value count at byte 0" },
  { "count without values", "\1", "truncated message at byte 1" },
  { "trailing garbage", "\1\2\0", "trailing bytes at byte 2" },
  { "unknown tag", "\1\99", "unknown tag 99 at byte 1" },
  { "absurd string length", "\1\4" .. uv(2 ^ 60) .. "abc", "truncated string" },
  { "string longer than the rest", "\1\4\5abcd", "truncated string" },
  { "overlong varint", "\1\4" .. rep("\128", 10) .. "\0", "varint too long" },
  { "absurd count", uv(2 ^ 60) .. "\0", "too many values" },
  { "count beyond the bytes", "\5\0\0", "truncated message" },
  { "count beyond the limit", uv(8001) .. rep("\0", 8001), "too many values" },
  { "truncated number", "\1\3\0\0\0", "truncated number" },
  { "truncated table", "\1\5\0\0\2\2", "truncated" },
  { "table without end", "\1\5\0\0", "truncated table" },
  { "ref with no tables", "\1\8\0", "reference to a value not yet sent" },
  { "ref out of range", "\1\5\0\0\2\8\1\7", "reference to a value not yet sent" },
  { "huge ref", "\1\5\0\0\2\8" .. uv(2 ^ 50) .. "\7", "reference to a value not yet sent" },
  { "end at top level", "\1\7", "table end where a value was expected" },
  { "upvalue join at top level", "\1\10\0\1", "upvalue join where a value was expected" },
  { "KEYS at top level", "\1\16", "keys marker where a value was expected at byte 1" },
  { "KEYS as a key", "\1\5\0\0\16\2\7", "keys marker where a value was expected at byte 4" },
  { "KEYS twice", "\1\14\0\0\2\16\16\2\7", "keys marker where a value was expected at byte 6" },
  { "KEYS as a value", "\1\14\0\0\16\2\16\7", "keys marker where a value was expected at byte 6" },
  { "truncated INT", "\1\17\128", "truncated number" },
  { "overlong INT", "\1\17" .. rep("\255", 10) .. "\0", "varint too long" },
  { "KREF before its KSET", "\1\19\3", "reference to a string not yet sent at byte 2" },
  { "KREF of another slot", "\2\18\3\1a\19\4", "reference to a string not yet sent" },
  { "string slot out of range", "\1\18\64\1a", "bad string slot at byte 2" },
  { "KREF slot out of range", "\1\19\255", "bad string slot" },
  { "truncated KSET", "\1\18", "truncated string at byte 2" },
  { "truncated KSET bytes", "\1\18\0\5ab", "truncated string" },
  { "truncated ARRAY", "\1\14\0\0\2", "truncated table" },
  { "ARRAY nil key after KEYS", "\1\14\0\0\16\0\2\7", "nil table key" },
  { "nil key", "\1\5\0\0\0\2\7", "nil table key" },
  { "NaN key", nan_key, "NaN table key" },
  { "metatable not a table", "\1\6\0\0\7\2", "metatable is not a table" },
  { "missing metatable", "\1\6\0\0\7", "truncated value" },
  { "function", encode(function() end), "function where data was expected at byte 1" },
  { "function in a table", encode({ 1, { f = function() end } }), "function where data was expected" },
  { "garbage function", "\1\9\3abc\0", "function where data was expected" },
  { "module not loaded", "\1" .. named("hd_codec_not_loaded"), 'no module in package.loaded named "hd_codec_not_loaded"', named = true },
  { "field not there", "\1" .. named("string", "no_such_field"), 'no value in package.loaded named "string"."no_such_field"', named = true },
  { "field of a module that is no table", "\1" .. named("hd_fnmod", "x"), "module is not a table", named = true },
  { "truncated name", "\1\11\50string", "truncated name" },
  { "a named function as a metamethod", encode(setmetatable({}, { __index = debug.getregistry })),
    "a named value in a metatable at byte 45" },
  { "a named function nested in a metatable",
    encode(setmetatable({}, { __index = { f = string.format } })), "a named value in a metatable" },
  { "a named function as a key of a metatable", encode(setmetatable({}, { [print] = true })),
    "a named value in a metatable" },
  { "a named function in a metatable's metatable",
    encode(setmetatable({}, setmetatable({}, { __call = print }))), "a named value in a metatable" },
  -- A table sent as data first, holding os.exit, then used as a metatable.
  { "a named function in a table sent as data, then used as a metatable",
    "\2\5\0\1\4\7__index" .. named("os", "exit") .. "\7\6\0\0\7\8\0",
    "a named value in a metatable at byte 22" },
  -- A table whose own metatable it is, os.exit added after the reference.
  { "a named function added to a table after it was made its own metatable",
    "\1\5\0\0\3" .. num_bytes(1) .. "\6\0\0\7\8\0\4\7__index" .. named("os", "exit") .. "\7",
    "a named value in a metatable at byte 37" },
}

describe("codec hostile input", function()
  setup(function() package.loaded.hd_fnmod = print end)
  teardown(function() package.loaded.hd_fnmod = nil end)

  for _, case in ipairs(hostile_cases) do
    it("refuses " .. case[1], function()
      local err = raises(case[3], decode, case[2])
      assert.truthy(err:find("^handler: bad message: "))
    end)
  end

  it("accepts absurd size hints without allocating them", function()
    local t = decode("\1\5" .. uv(2 ^ 40) .. uv(2 ^ 40) .. "\7")
    assert.same({}, t)
    local u = decode("\1\5" .. uv(2 ^ 63) .. uv(2 ^ 30) .. "\2\2\7")
    assert.same({ [true] = true }, u)
  end)

  it("refuses nesting a million deep, quickly", function()
    local s = "\1" .. rep("\5\0\0\2", 1e6)
    local t0 = os.clock()
    raises("nested too deep", decode, s)
    raises("nested too deep", decode, s, true)
    assert.is_true(os.clock() - t0 < 1)
  end)

  it("refuses metatables nested too deep", function()
    raises("nested too deep", decode, "\1" .. rep("\6\0\0\7", 1000))
  end)

  it("never loads bytecode nor requires when hostile", function()
    local loads = 0
    package.preload.hd_codec_spy = function() loads = loads + 1; return {} end
    finally(function() package.preload.hd_codec_spy = nil; package.loaded.hd_codec_spy = nil end)
    raises("no module", decode, "\1" .. named("hd_codec_spy"))
    assert.equals(0, loads)
    raises("function where data was expected", decode, encode(function() loads = loads + 1 end))
    assert.equals(0, loads)
  end)

  it("refuses every strict prefix of a valid message", function()
    local shared = { "s" }
    local t = { 1, "two", shared, shared, { x = -0.0, y = 1 / 0, [true] = false },
      string.format, io.stdout, setmetatable({ 9 }, { __index = shared }) }
    t.self = t
    local msg = encode(t, "tail", nil, 3)
    assert.is_true(same(t, (decode(msg))))
    for i = 0, #msg - 1 do
      local ok, err = pcall(decode, msg:sub(1, i))
      assert(not ok, "prefix " .. i .. " decoded")
      assert(type(err) == "string" and err:find("^handler: bad message: "), err)
    end
  end)

  it("refuses every strict prefix of a closure, even when trusted", function()
    local up = { 1, 2 }
    local function f() return up end
    local msg = encode(f)
    for i = 0, #msg - 1 do
      local ok, err = pcall(decode, msg:sub(1, i), true)
      assert(not ok, "prefix " .. i .. " decoded")
      assert(type(err) == "string" and err:find("^handler: bad message: "), err)
    end
  end)

  it("decodes or refuses random bytes, never crashes", function()
    local decoded, refused = 0, 0
    each_random_message(12345, {}, function(s)
      local ok, err = pcall(decode, s)
      if ok then
        decoded = decoded + 1
      else
        refused = refused + 1
        assert(type(err) == "string" and err:find("^handler: bad message: "), tostring(err))
      end
    end)
    assert.is_true(decoded > 0)
    assert.is_true(refused > 0)
  end)
end)

-- What core.validate says of message s, checked against what decode (hostile)
-- does with it: whatever validate accepts decodes, unless a name is missing
-- from package.loaded; whatever it refuses, decode refuses with the same
-- message, unless it is a named value (which validate cannot tell from a
-- named function) in or around a metatable.
local function name_lookup(err)
  return err:find("^handler: bad message: no module in package.loaded named ")
    or err:find("^handler: bad message: no value in package.loaded named ")
    or err:find("^handler: bad message: module is not a table: ")
end

local function named_mt(err)
  return err:find("^handler: bad message: a named value in a metatable at byte %d+$")
end

local function at_byte(err)
  return tonumber(err:match(" at byte (%d+)$"))
end

-- Refused for what a name turned out to be: validate, which cannot look it
-- up, goes on and refuses (every named metatable) at the same byte or later.
local function value_level(derr, vmsg)
  return (name_lookup(derr) or derr:find("^handler: bad message: metatable is not a table at byte "))
    and at_byte(vmsg) and at_byte(vmsg) >= at_byte(derr)
end

local function agree(s)
  local vok, vmsg = validate(s)
  local dok, derr = pcall(decode, s)
  if vok then
    assert(vmsg == nil, "validate returned a message with true")
    if not dok and not name_lookup(derr) then
      error(("validate accepted what decode refuses: %q"):format(derr), 2)
    end
  else
    assert(type(vmsg) == "string" and vmsg:find("^handler: bad message: "), tostring(vmsg))
    if dok then
      if not named_mt(vmsg) then
        error(("validate refused what decode accepts: %q"):format(vmsg), 2)
      end
    elseif vmsg ~= derr and not named_mt(vmsg) and not value_level(derr, vmsg) then
      error(("validate and decode refuse with different messages: %q vs %q"):format(vmsg, derr), 2)
    end
  end
  return vok, vmsg, dok, derr
end

describe("codec validate", function()
  setup(function() package.loaded.hd_fnmod = print end)
  teardown(function() package.loaded.hd_fnmod = nil end)

  for _, case in ipairs(hostile_cases) do
    it("agrees with decode on " .. case[1], function()
      local ok, msg = validate(case[2])
      local derr = raises(case[3], decode, case[2])
      if case.named then
        assert.is_true(ok)
        assert.is_nil(msg)
      else
        assert.is_false(ok)
        assert.equals(derr, msg)
      end
    end)
  end

  for _, case in ipairs(data_cases) do
    it("accepts " .. case[1] .. " as decode does", function()
      local s = encode(case[2])
      assert.is_true((validate(s)))
      assert.is_true(same(case[2], (decode(s))))
    end)
  end

  it("accepts shared references, cycles, table keys and names", function()
    local shared = { "s" }
    local t = { 1, "two", shared, shared, { x = -0.0, y = 1 / 0, [true] = false },
      string.format, io.stdout, setmetatable({ 9 }, { __index = shared }), [shared] = shared }
    t.self = t
    t.child = { parent = t }
    local mt = { tag = "mt" }
    mt.__index = mt
    local msgs = {
      encode(t, "tail", nil, 3),
      encode({ setmetatable({}, mt), setmetatable({}, mt) }),
      encode(string, string.format, print, _G, package.loaded, ffi, ffi.C),
      encode(),
      encode(nil),
      encode(0 / 0, -0.0, math.huge),
    }
    for i, s in ipairs(msgs) do
      local ok, msg = validate(s)
      assert(ok, i .. ": " .. tostring(msg))
      assert(pcall(decode, s), i)
    end
  end)

  it("accepts absurd size hints as decode does", function()
    assert.is_true((validate("\1\5" .. uv(2 ^ 40) .. uv(2 ^ 40) .. "\7")))
    assert.is_true((validate("\1\5" .. uv(2 ^ 63) .. uv(2 ^ 30) .. "\2\2\7")))
    assert.is_true((validate("\1\5\1\0\3" .. num_bytes(1) .. "\4\1a\7")))
  end)

  it("accepts a 1 MB string, a large array and 200 levels, refuses 201", function()
    assert.is_true((validate(encode(rep("0123456789abcdef", 65536)))))
    local t = {}
    for i = 1, 100000 do t[i] = { i } end
    assert.is_true((validate(encode(t))))
    local deep = {}
    for _ = 2, 200 do deep = { deep } end
    assert.is_true((validate(encode(deep))))
    agree(encode(deep))
    local s = "\1" .. rep("\5\0\0\3" .. num_bytes(1), 201) .. rep("\7", 201)
    local ok, msg = validate(s)
    assert.is_false(ok)
    assert.equals(select(2, pcall(decode, s)), msg)
    assert.truthy(msg:find("nested too deep", 1, true))
  end)

  it("refuses nesting a million deep with decode's message", function()
    local s = "\1" .. rep("\5\0\0\2", 1e6)
    local ok, msg = validate(s)
    assert.is_false(ok)
    assert.equals(select(2, pcall(decode, s)), msg)
    ok, msg = validate("\1" .. rep("\6\0\0\7", 1000))
    assert.is_false(ok)
    assert.equals(select(2, pcall(decode, "\1" .. rep("\6\0\0\7", 1000))), msg)
  end)

  it("keeps the top-level value limit of encode and decode", function()
    local _, err = pcall(encode, unpack({}, 1, 7990))
    local max = tonumber(err:match("at most (%d+)"))
    assert.is_number(max)
    local s = encode(unpack({}, 1, max))
    assert.is_true((validate(s)))
    assert.equals(max, select("#", decode(s)))
    s = uv(max + 1) .. rep("\0", max + 1)
    local ok, msg = validate(s)
    assert.is_false(ok)
    assert.equals(raises("too many values at byte", decode, s), msg)
  end)

  it("counts the decoder's Lua stack: many values, then deep nesting", function()
    -- The decoder holds every top-level value and two slots per open table;
    -- both sides refuse the same message, wherever decode is called from.
    local _, err = pcall(encode, unpack({}, 1, 7990))
    local max = tonumber(err:match("at most (%d+)"))
    local deep = "\5\0\0\3" .. num_bytes(1)
    local function msg(nvalues, depth)
      return uv(nvalues) .. rep("\0", nvalues - 1) .. rep(deep, depth - 1) .. "\5\0\0\7"
        .. rep("\7", depth - 1)
    end
    local vok, vmsg, dok, derr = agree(msg(max, 200))
    assert.is_false(vok)
    assert.is_false(dok)
    assert.truthy(derr:find("nested too deep for the Lua stack", 1, true))
    assert.equals(derr, vmsg)
    local refused_in_a_wrapper = select(2, pcall(function() return decode(msg(max, 200)) end))
    assert.equals(derr, refused_in_a_wrapper)
    vok, vmsg, dok = agree(msg(7000, 200))
    assert.is_true(vok, vmsg)
    assert.is_true(dok)
    assert.is_true((agree(msg(max, 1))))
    -- At the exact limit, nesting in value, key and metatable position
    -- (two, one and one slots per level).
    local function keys(nvalues, depth)
      return uv(nvalues) .. rep("\0", nvalues - 1) .. rep("\5\0\0", depth) .. "\7"
        .. rep("\2\7", depth - 1)
    end
    local function mts(nvalues, depth)
      return uv(nvalues) .. rep("\0", nvalues - 1) .. rep("\6\0\0\7", depth - 1) .. "\5\0\0\7"
    end
    for _, depth in ipairs({ 3, 50, 199, 200 }) do
      local fits = { [msg] = max + 1 - 2 * (depth - 1), [keys] = max + 1 - (depth - 1),
        [mts] = max + 1 - (depth - 1) }
      for build, n in pairs(fits) do
        assert.is_true((agree(build(n, depth))), depth)
        vok, vmsg = agree(build(n + 1, depth))
        assert.is_false(vok, depth)
        assert.truthy(vmsg:find("nested too deep for the Lua stack", 1, true))
      end
    end
  end)

  it("refuses every strict prefix of a valid message with decode's message", function()
    local shared = { "s" }
    local t = { 1, "two", shared, { x = -0.0, [true] = false }, string.format,
      setmetatable({ 9 }, { __index = shared }) }
    t.self = t
    local s = encode(t, "tail", nil, 3)
    assert.is_true((validate(s)))
    for i = 0, #s - 1 do
      local p = s:sub(1, i)
      local ok, msg = validate(p)
      assert(not ok, "prefix " .. i .. " validated")
      assert.equals(select(2, pcall(decode, p)), msg)
    end
  end)

  it("refuses a named function as a metatable, as decode does", function()
    local s = "\1\6\0\0\7" .. named("os", "exit")
    local derr = raises("metatable is not a table at byte 14", decode, s)
    local vok, vmsg = agree(s)
    assert.is_false(vok)
    assert.equals("handler: bad message: a named value in a metatable at byte 14", vmsg)
    assert.are_not.equal(derr, vmsg)
    -- Stopped at the name, decode never sees what follows; validate does.
    vok, vmsg = agree(s .. "\2")
    assert.equals("handler: bad message: trailing bytes at byte 14", vmsg)
  end)

  it("agrees with decode on random and mutated bytes", function()
    local accepted, refused = 0, 0
    each_random_message(54321, {
      encode(setmetatable({}, { __index = string }), { f = print }),
      "\2\5\0\1\4\7__index" .. named("os", "exit") .. "\7\6\0\0\7\8\0",
    }, function(s)
      if agree(s) then accepted = accepted + 1 else refused = refused + 1 end
    end)
    assert.is_true(accepted > 100)
    assert.is_true(refused > 100)
  end)

  it("refuses a string argument only", function()
    assert.is_false(pcall(validate))
    assert.is_false(pcall(validate, {}))
  end)
end)

describe("codec metatables in hostile input", function()
  it("carries data-only metatables", function()
    local s = encode(setmetatable({}, { __index = { x = 1 }, __mode = "k" }))
    assert.is_true((validate(s)))
    local t = decode(s)
    assert.equals(1, t.x)
  end)

  it("carries named values beside metatables, and data shared with them", function()
    local shared = { y = 2 }
    local s = encode({ shared, string.format, io.stdout, setmetatable({}, { __index = shared }),
      { f = print } })
    assert.is_true((validate(s)))
    local t = decode(s)
    assert.equals(2, t[4].y)
    assert.equals(string.format, t[2])
  end)

  it("refuses a host function in a metatable, so reading a field calls nothing", function()
    local s = encode(setmetatable({}, { __index = debug.getregistry }))
    raises("handler: bad message: a named value in a metatable", decode, s)
    local ok, msg = validate(s)
    assert.is_false(ok)
    assert.truthy(msg:find("a named value in a metatable", 1, true))
  end)

  it("decodes a named table in a metatable, which validate cannot tell from a function", function()
    local s = encode(setmetatable({}, { __index = string }))
    local t = decode(s)
    assert.equals(string, getmetatable(t).__index)
    local ok, msg = validate(s)
    assert.is_false(ok)
    assert.equals("handler: bad message: " .. "a named value in a metatable at byte 34", msg)
    local ok2, msg2 = validate(encode(setmetatable({}, string)))
    assert.is_false(ok2)
    assert.truthy(msg2:find("a named value in a metatable", 1, true))
    assert.is_true(pcall(decode, encode(setmetatable({}, string))))
  end)

  it("remembers which of thousands of tables hold named values", function()
    local big = {}
    for i = 1, 5000 do big[i] = { i } end
    big[4500].__index = os.exit
    local s = encode(big, setmetatable({}, big[4500]))
    local vok, vmsg, dok, derr = agree(s)
    assert.is_false(vok)
    assert.is_false(dok)
    assert.truthy(derr:find("a named value in a metatable", 1, true))
    assert.equals(derr, vmsg)
    big[4500].__index = big[4499]
    vok, vmsg, dok = agree(encode(big, setmetatable({}, big[4500]), os.exit))
    assert.is_true(vok, vmsg)
    assert.is_true(dok)
  end)

  it("refuses a named function a metatable reaches, whichever was sent first", function()
    -- obj's metatable is { __index = X }, X = { Y }, Y = { f = os.exit }.
    local function x_bytes(fn)
      return "\5\0\0\3" .. num_bytes(1) .. "\5\0\0\4\1f" .. fn .. "\7\7"
    end
    local function data_first(fn)
      return "\2" .. x_bytes(fn) .. "\6\0\0\7\5\0\0\4\7__index\8\0\7"
    end
    local function mt_first(fn)
      return "\2\6\0\0\7\5\0\0\4\7__index" .. x_bytes(fn) .. "\7\8\2"
    end
    for _, build in ipairs({ data_first, mt_first }) do
      local vok, vmsg, dok, derr = agree(build(named("os", "exit")))
      assert.is_false(vok)
      assert.is_false(dok)
      assert.truthy(derr:find("a named value in a metatable at byte", 1, true))
      assert.equals(derr, vmsg)
      vok, vmsg, dok = agree(build("\2"))
      assert.is_true(vok, vmsg)
      assert.is_true(dok)
      -- A named table: decoded (the host's string table is no function),
      -- refused by validate, which cannot tell.
      vok, vmsg, dok = agree(build(named("string")))
      assert.is_false(vok)
      assert.is_true(dok)
    end
  end)

  it("carries any number of objects sharing a data-only metatable", function()
    local mt = { kind = "point" }
    mt.__index = mt
    local t = { fmt = string.format }
    for i = 1, 1000 do t[i] = setmetatable({ x = i }, mt) end
    local s = encode(t)
    assert.is_true((validate(s)))
    local u = decode(s)
    assert.equals("point", u[1000].kind)
    assert.equals(getmetatable(u[1]), getmetatable(u[1000]))
  end)

  it("leaves trusted input as it was", function()
    local t = decode(encode(setmetatable({}, { __index = debug.getregistry })), true)
    assert.equals(debug.getregistry, getmetatable(t).__index)
    local shared = { __index = os.exit }
    local u = decode(encode({ shared, setmetatable({}, shared) }), true)
    assert.equals(os.exit, getmetatable(u[2]).__index)
  end)
end)

describe("codec trusted input checks", function()
  local function f1()
    local up = 1
    return function() return up end
  end
  local bc = string.dump(f1())

  it("loads a hand-built closure", function()
    local g = decode("\1\9" .. uv(#bc) .. bc .. "\1\3" .. num_bytes(7), true)
    assert.equals(7, g())
  end)

  it("refuses an upvalue count that does not match", function()
    raises("function upvalue count mismatch", decode,
      "\1\9" .. uv(#bc) .. bc .. "\2\0\0", true)
  end)

  it("refuses bad upvalue joins", function()
    raises("bad reference in upvalue join", decode,
      "\1\9" .. uv(#bc) .. bc .. "\1\10\5\1", true)
    raises("bad upvalue join", decode, "\1\9" .. uv(#bc) .. bc .. "\1\10\0\2", true)
    raises("bad upvalue join", decode,
      "\1\5\0\0\2\9" .. uv(#bc) .. bc .. "\1\10\0\1\7", true)
  end)

  it("refuses source text where bytecode belongs", function()
    local src = "return 1"
    raises("function is not bytecode", decode, "\1\9" .. uv(#src) .. src .. "\0", true)
  end)

  it("refuses bytecode that does not load", function()
    raises("cannot load function", decode, "\1\9\4\27LJ\99\0", true)
  end)
end)

describe("codec decoding a job's message with the collector paused", function()
  -- HD_DEC_NOGC, as a worker decodes its job: a message of 64 KiB or more
  -- is decoded with the collector paused, which must be running again
  -- afterwards, also when the message is refused.
  local recs = {}
  for i = 1, 5000 do recs[i] = { id = i, name = "x" .. i, f = i + 0.5 } end
  local s = encode(recs)

  it("decodes the same values", function()
    assert.is_true(#s >= 64 * 1024)
    assert.same(recs, decode(s, true, true))
    assert.same(recs, decode(s, false, true))
    assert.is_true(collectgarbage("isrunning"))
  end)

  it("restarts the collector when the message is refused", function()
    raises("truncated table", decode, s:sub(1, -2), true, true)
    assert.is_true(collectgarbage("isrunning"))
    raises("trailing bytes", decode, s .. "x", false, true)
    assert.is_true(collectgarbage("isrunning"))
  end)

  it("leaves a collector the caller stopped stopped", function()
    collectgarbage("stop")
    local ok, v = pcall(decode, s, true, true)
    local running = collectgarbage("isrunning")
    collectgarbage("restart")
    assert.is_true(ok)
    assert.equals(5000, #v)
    assert.is_false(running)
  end)
end)
