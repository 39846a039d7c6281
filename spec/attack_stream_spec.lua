-- attack_stream_spec.lua: entries are hostile input. Anyone who can XADD to
-- the stream can try to break a `handler serve` consumer with malformed
-- entries: each one must end as one clear failed outcome (or a dead letter
-- when it crashes its worker), the limits it asks for stay within the
-- consumer's, and the consumer goes on serving. The consumer runs in the
-- strict sandbox, as SECURITY.md recommends for a stream others write.
local H = require("spec.support.helpers")
local redis = require("spec.support.redis")

local usable, missing = redis.available()
if not usable then
  describe("handler serve, given hostile entries", function()
    pending(missing .. " (tools/setup installs it)")
  end)
  return
end
local handler = require("handler")
local remote_mod = require("handler.remote")

local core = handler._core

-- A block's Redis, one consumer started with `args` and a producer, made
-- once for the block and always stopped after it: srv, consumer and
-- producer in the table it returns.
local function serving(args)
  local st = {}
  lazy_setup(function()
    st.srv = redis.start()
    st.consumer = redis.consumer(st.srv, args)
    st.producer = handler.remote{ redis = st.srv.addr, stream = "jobs" }
  end)
  lazy_teardown(function()
    if st.producer then st.producer:close() end
    redis.stop_all()
  end)
  return st
end

describe("handler serve, given hostile entries", function()
  local srv, consumer, producer
  local st = serving({ "--stream", "jobs", "-j", "2", "--sandbox", "--retries", "1",
    "--max-ms", "300", "--max-heap", "1M", "--visibility-ms", "2000", "--no-progress" })
  before_each(function() srv, consumer, producer = st.srv, st.consumer, st.producer end)

  -- The header every well-formed entry has.
  local function header()
    return { "format", remote_mod.FORMAT, "proto", remote_mod.PROTOCOL, "build", remote_mod.BUILD }
  end

  -- XADDs an entry with `fields` (a flat list); returns its id.
  local function add(fields)
    local cmd = { "XADD", "jobs", "*" }
    for _, f in ipairs(fields) do cmd[#cmd + 1] = f end
    return srv:call(unpack(cmd))
  end

  -- Waits for the outcome of entry `id`: its fields, and whether it is a
  -- dead letter.
  local function outcome_of(id)
    local found, dead
    assert.is_true(H.wait_until(function()
      for _, e in ipairs(srv:entries("jobs:results")) do
        if e.fields.id == id then found, dead = e.fields, false end
      end
      for _, e in ipairs(srv:entries("jobs:dead")) do
        if e.fields.id == id then found, dead = e.fields, true end
      end
      return found ~= nil
    end, 20), "no outcome for " .. id .. "\n" .. consumer:output())
    return found, dead
  end

  local function failure(fields)
    local id = add(fields)
    local f, dead = outcome_of(id)
    local ok, err = remote_mod.decode_outcome(f.ok, f.value)
    assert.is_false(ok)
    assert.is_table(err)
    return err, dead, f
  end

  local function with_header(more)
    local t = header()
    for _, x in ipairs(more) do t[#t + 1] = x end
    return t
  end

  it("refuses entries without the format, protocol and build it speaks", function()
    local err = failure({ "hello", "world" })
    assert.are.equal("BadEntry", err.type)
    assert.matches("entry speaks format nil, this consumer speaks 1", err.message, 1, true)
    err = failure({ "format", "1", "proto", "x" })
    assert.matches("entry speaks protocol x, this consumer speaks", err.message, 1, true)
    err = failure({ "format", "1", "proto", remote_mod.PROTOCOL, "build", "00" })
    assert.matches("another LuaJIT (its bytecode differs)", err.message, 1, true)
    err = failure(header())
    assert.matches("entry has no fn field (this consumer runs closures)", err.message, 1, true)
  end)

  it("refuses limits that are not numbers, and bounds the rest by its own", function()
    for _, bad in ipairs({ { "max_ms", "abc" }, { "max_ms", "-1" }, { "max_ms", "nan" },
      { "max_heap_bytes", "0" }, { "max_heap_bytes", "inf" }, { "max_cpu_ms", "-5" } }) do
      local err = failure(with_header({ bad[1], bad[2], "fn", core.encode_job(function() end) }))
      assert.are.equal("BadEntry", err.type)
      assert.matches(bad[1] .. " is not a", err.message, 1, true)
    end
    -- An entry that asks for an hour gets the consumer's 300 ms.
    local err, dead = failure(with_header({ "max_ms", "3600000",
      "fn", core.encode_job(function() while true do end end) }))
    assert.are.equal("Timeout", err.type)
    assert.are.equal("Took more than 300ms to complete", err.message)
    assert.is_true(dead)
    -- And the consumer's 1 MiB heap, not the 1 GiB it asks for.
    err = failure(with_header({ "max_heap_bytes", tostring(2^30),
      "fn", core.encode_job(function() local t = {} for i = 1, 1e8 do t[i] = i end end) }))
    assert.are.equal("OOM", err.type)
  end)

  it("fails a malformed closure in the worker, never in the consumer", function()
    local good = core.encode_job(function(a) return a end, 1)
    local cases = {
      "", "\0", "garbage", good:sub(1, #good - 3), core.encode(42), core.encode({}),
      good:sub(1, 8) .. string.rep("\255", 64),
      string.rep("\1", 4096),
    }
    -- Bytes of a well-formed job flipped one by one, at a few places.
    for _, at in ipairs({ 2, 5, 9, 17, 33, math.floor(#good / 2), #good - 1 }) do
      local b = good:byte(at)
      cases[#cases + 1] = good:sub(1, at - 1) .. string.char((b + 97) % 256) .. good:sub(at + 1)
    end
    for _, fn in ipairs(cases) do
      local _, f = nil, nil
      local id = add(with_header({ "fn", fn }))
      f = outcome_of(id)
      local ok, v = remote_mod.decode_outcome(f.ok, f.value)
      -- A flipped byte may still be a valid job; otherwise a failure value.
      if not ok then assert.is_string(v.type) end
    end
    assert.is_nil(consumer:exited())
  end)

  it("keeps reserved fields from being spoofed in the outcome", function()
    local id = add(with_header({ "id", "0-1", "ok", "1", "value", core.encode(true),
      "fn", core.encode_job(function() error("nope", 0) end) }))
    local f = outcome_of(id)
    assert.are.equal(id, f.id)
    assert.are.equal("0", f.ok)
  end)

  it("runs what it is sent in the strict sandbox", function()
    local ok, err = redis.await(producer:async(function() return io.open("/etc/hostname") end))
    assert.is_false(ok)
    assert.are.equal("ProcessExit", err.type)
    ok, err = redis.await(producer:async(function() return require("ffi") end))
    assert.is_false(ok)
  end)

  it("survives a flood of random entries and still serves", function()
    math.randomseed(7)
    local ids = {}
    for i = 1, 200 do
      local fields = with_header({})
      for _ = 1, math.random(0, 3) do
        local bytes = {}
        for k = 1, math.random(0, 64) do bytes[k] = string.char(math.random(0, 255)) end
        fields[#fields + 1] = ({ "fn", "max_ms", "input", "x" })[math.random(1, 4)]
        fields[#fields + 1] = table.concat(bytes)
      end
      if i % 3 == 0 then fields[2] = "2" end
      ids[#ids + 1] = add(fields)
    end
    -- (Pending counts only what was delivered: wait for the outcomes.)
    local count
    local function all_done()
      count = {}
      for _, e in ipairs(srv:entries("jobs:results")) do
        count[e.fields.id] = (count[e.fields.id] or 0) + 1
      end
      for _, e in ipairs(srv:entries("jobs:dead")) do
        count[e.fields.id] = (count[e.fields.id] or 0) + 1
      end
      for _, id in ipairs(ids) do
        if count[id] == nil then return false end
      end
      return srv:pending("jobs") == 0
    end
    assert.is_true(H.wait_until(all_done, 60), consumer:output())
    for _, id in ipairs(ids) do assert.are.equal(1, count[id], id) end
    assert.are.same({ true, 6 }, { redis.await(producer:async(function() return 2 * 3 end)) })
    assert.is_nil(consumer:exited())
  end)
end)

describe("handler serve --sandbox-each", function()
  local st = serving({ "--stream", "jobs", "-j", "2", "--sandbox-each", "--max-ms", "2000",
    "--no-progress" })

  it("runs each entry in a jailed process of its own: one entry leaves nothing to the next", function()
    -- Each entry looks for what an entry before it may have left in its
    -- worker's memory (what hostile bytecode could do as well as the FFI
    -- does here), leaves it for the next, and says whether it found it.
    local function probe()
      local ffi = require("ffi")
      pcall(ffi.cdef, "int setenv(const char *, const char *, int); char *getenv(const char *);")
      local found = ffi.C.getenv("LEFT_BY_AN_ENTRY") ~= nil
      ffi.C.setenv("LEFT_BY_AN_ENTRY", "1", 1)
      return found, io.open("/etc/hostname") ~= nil
    end
    for _ = 1, 6 do
      local ok, found, host = redis.await(st.producer:async(probe))
      assert.is_true(ok, tostring(found))
      assert.is_false(found)
      -- The jail: the machine's files are not there.
      assert.is_false(host)
    end
  end)
end)
