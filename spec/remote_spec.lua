-- remote_spec.lua: the producer, handler.remote: closures with their
-- upvalues across a Redis stream to a `handler serve` consumer and back,
-- errors as the same values a local job returns, entries a consumer of
-- another build refuses, map, and the misuse that raises.
local H = require("spec.support.helpers")
local redis = require("spec.support.redis")

local usable, missing = redis.available()
if not usable then
  describe("handler.remote", function()
    pending(missing .. " (tools/setup installs it)")
  end)
  return
end
local handler = require("handler")

describe("handler.remote", function()
  local srv, consumer, remote

  lazy_setup(function()
    srv = redis.start()
    consumer = redis.consumer(srv, { "--stream", "jobs", "-j", "2", "--visibility-ms", "2000",
      "--retries", "0", "--max-ms", "10000", "--no-progress" })
    remote = handler.remote{ redis = srv.addr, stream = "jobs" }
  end)

  lazy_teardown(function()
    if remote then remote:close() end
    redis.stop_all()
  end)

  it("runs a closure with its upvalues and arguments, and returns its results", function()
    local shared = { n = 1 }
    local config = { scale = 3, shared = shared, again = shared, name = "x\0y" }
    local function helper(v) return v * config.scale end
    local job = assert(remote:async(function(a, b)
      config.shared.n = config.shared.n + 1
      return helper(a) + b, config.again.n, config.name, nil, { nested = { true } }
    end, { args = { 2, 5 } }))
    assert.is_string(job.id)
    local r = H.pack(redis.await(job))
    assert.are.same({ n = 6, true, 11, 2, "x\0y", nil, { nested = { true } } }, r)
    -- Awaited again: the same outcome.
    assert.are.same(r, H.pack(redis.await(job)))
    -- The caller's tables are untouched: the job had copies.
    assert.are.equal(1, shared.n)
  end)

  it("carries a closure's own functions and the modules it names", function()
    local fmt = string.format
    local function square(x) return x * x end
    local ok, v = redis.await(remote:async(function()
      return fmt("%d-%s", square(7), ("ab"):upper())
    end))
    assert.is_true(ok)
    assert.are.equal("49-AB", v)
  end)

  it("returns failures as the error values a local job returns", function()
    local pool = handler.pool{ max_workers = 2 }
    finally(function() pool:close() end)
    local cases = {
      { function() error("boom", 0) end, {} },
      { function() error({ code = 42 }) end, {} },
      { function() while true do end end, { max_ms = 100 } },
      { function() local t = {} for i = 1, 1e7 do t[i] = { i } end end,
        { max_heap_bytes = 256 * 1024 } },
      { function() os.exit(3) end, {} },
    }
    for _, case in ipairs(cases) do
      local lok, lerr = pool:async(case[1], case[2]):await()
      local rok, rerr = redis.await(remote:async(case[1], case[2]))
      assert.is_false(lok)
      assert.is_false(rok)
      for _, k in ipairs({ "type", "reason", "cause" }) do
        assert.are.same(lerr[k], rerr[k], k)
      end
      -- A raised table's message names the table, which differs.
      if type(lerr.reason) ~= "table" then assert.are.equal(tostring(lerr), tostring(rerr)) end
      assert.are.equal(getmetatable(lerr), getmetatable(rerr))
    end
  end)

  it("has an entry of another LuaJIT build or protocol refused, clearly", function()
    local other = handler.remote{ redis = srv.addr, stream = "jobs" }
    finally(function() other:close() end)
    other._build = "1b4c4a02"
    local ok, err = redis.await(other:async(function() return 1 end))
    assert.is_false(ok)
    assert.are.equal("BadEntry", err.type)
    assert.matches("entry was encoded by another LuaJIT (its bytecode differs)", err.message,
      1, true)
    -- An entry of another protocol, written by hand.
    local id = srv:call("XADD", "jobs", "*", "format", "1", "proto", "999", "build",
      require("handler.remote").BUILD, "fn", "x")
    local outcome
    assert.is_true(H.wait_until(function()
      for _, e in ipairs(srv:entries("jobs:results")) do
        if e.fields.id == id then outcome = e.fields end
      end
      return outcome ~= nil
    end, 10))
    assert.are.equal("0", outcome.ok)
    local _, e2 = require("handler.remote").decode_outcome(outcome.ok, outcome.value)
    assert.are.equal("BadEntry", e2.type)
    assert.matches("entry speaks protocol 999, this consumer speaks " .. handler._core.protocol,
      e2.message, 1, true)
    -- The consumer goes on.
    assert.are.same({ true, 2 }, { redis.await(remote:async(function() return 2 end)) })
  end)

  it("maps a function over inputs, in order or as they finish", function()
    local k = 10
    local got = {}
    for i, ok, v in remote:map(function(x) return x * k end, { 1, 2, 3, 4, 5 }, { window = 2 }) do
      assert.is_true(ok)
      got[#got + 1] = { i, v }
    end
    assert.are.same({ { 1, 10 }, { 2, 20 }, { 3, 30 }, { 4, 40 }, { 5, 50 } }, got)
    local seen = {}
    for i, ok, v in remote:map(function(x)
      if x == 1 then local t = os.clock() + 0.3 while os.clock() < t do end end
      return x
    end, { 1, 2, 3 }, { ordered = false }) do
      assert.is_true(ok)
      assert.are.equal(i, v)
      seen[#seen + 1] = i
    end
    table.sort(seen)
    assert.are.same({ 1, 2, 3 }, seen)
  end)

  it("raises on misuse, naming the culprit", function()
    assert.has_error(function() handler.remote{ redis = "nowhere:", stream = "s" } end,
      "handler.remote: bad option 'redis' (expected \"host:port\" of a Redis server, got string)")
    assert.has_error(function() handler.remote{ redis = srv.addr } end,
      "handler.remote: no stream (stream = \"jobs\")")
    assert.has_error(function() handler.remote{ redis = srv.addr, stream = "s", x = 1 } end,
      "handler.remote: unknown option 'x'")
    assert.has_error(function() remote:async(42) end,
      "bad argument #1 to 'async' (function expected, got number)")
    assert.has_error(function() remote:async(function() end, { max_ms = "1" }) end,
      "remote:async: bad option 'max_ms' (expected a non-negative number of milliseconds, got string)")
    local co = coroutine.create(function() end)
    assert.has_error(function() remote:async(function() return co end) end)
  end)

  it("returns RemoteUnavailable when Redis cannot be reached", function()
    local port = require("spec.support.nginx").free_port()
    local r = handler.remote{ redis = "127.0.0.1:" .. port, stream = "s" }
    local job, err = r:async(function() return 1 end)
    assert.is_nil(job)
    assert.are.equal("RemoteUnavailable", err.type)
    assert.matches("Redis at 127.0.0.1:" .. port, err.message, 1, true)
  end)

  it("says which package it needs when lua-redis is missing", function()
    local out = H.run_host([[
      package.preload.redis = function() error("module 'redis' not found") end
      print(pcall(require("handler").remote, { redis = "127.0.0.1:1", stream = "s" }))
    ]])
    assert.matches("handler.remote: needs lua-redis (Debian: apt install lua-redis)", out, 1, true)
  end)

  it("left the consumer running, with nothing pending", function()
    assert.is_nil(consumer:exited())
    assert.are.equal(0, srv:pending("jobs"))
  end)
end)
