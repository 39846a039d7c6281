-- map_spec.lua: pool:map and handler.map.
local handler = require("handler")
local H = require("spec.support.helpers")

local function collect(iter)
  local out = {}
  for i, ok, a, b in iter do out[#out + 1] = { i = i, ok = ok, a = a, b = b } end
  return out
end

describe("pool:map", function()
  local pool
  H.leak_checked()
  before_each(function() pool = handler.pool{ max_workers = 2 } end)
  after_each(function() pool:close() end)

  it("yields every item in input order by default, with all of its results", function()
    local out = collect(pool:map(function(x) return x * x, -x end, { 1, 2, 3, 4, 5, 6, 7 }))
    assert.are.equal(7, #out)
    for k, r in ipairs(out) do
      assert.are.same({ i = k, ok = true, a = k * k, b = -k }, r)
    end
  end)

  it("yields as items finish when ordered = false", function()
    local sleep = function(ms)
      local c = os.clock()
      while (os.clock() - c) * 1000 < ms do end
      return ms
    end
    local order = {}
    for i, ok in pool:map(sleep, { 600, 10, 10, 10 }, { ordered = false }) do
      assert.is_true(ok)
      order[#order + 1] = i
    end
    assert.are.equal(4, #order)
    assert.are_not.equal(1, order[1])
    assert.are.equal(1, order[4])
  end)

  it("reads a lazy input no further than the window ahead", function()
    local read, most_ahead, yielded = 0, 0, 0
    local function input()
      read = read + 1
      if read - yielded > most_ahead then most_ahead = read - yielded end
      if read <= 40 then return read end
    end
    local sum = 0
    for _, ok, v in pool:map(function(x) return x end, input, { window = 3 }) do
      assert.is_true(ok)
      yielded = yielded + 1
      sum = sum + v
    end
    assert.are.equal(40 * 41 / 2, sum)
    assert.is_true(most_ahead <= 4, "read " .. most_ahead .. " ahead") -- 3, plus the nil
  end)

  it("costs a poisoned item only its own limit", function()
    local t0 = H.now()
    local times = {}
    local inputs = { "hang", 1, 2, 3, 4, 5, 6 }
    for i, ok, v in pool:map(function(x)
      if x == "hang" then while true do end end
      return x
    end, inputs, { max_ms = 1000, ordered = false }) do
      times[i] = H.now() - t0
      if i == 1 then
        assert.is_false(ok)
        assert.are.equal("Timeout", v.type)
      else
        assert.is_true(ok)
      end
    end
    -- The others ran on the other worker meanwhile, not after the hang.
    for i = 2, 7 do assert.is_true(times[i] < 0.9, "item " .. i .. " at " .. times[i]) end
    assert.is_true(times[1] >= 0.9)
  end)

  it("retries items that died of their limits, then gives their error", function()
    local dir = H.tmpdir()
    local ok_items, failures = 0, 0
    for _, ok, v in pool:map(function(path)
      local f = io.open(path)
      if f == nil then
        f = assert(io.open(path, "w"))
        f:close()
        while true do end -- the first try hangs
      end
      f:close()
      return "second try"
    end, { dir .. "/a", dir .. "/b" }, { max_ms = 200, retries = 1 }) do
      if ok then
        ok_items = ok_items + 1
        assert.are.equal("second try", v)
      else
        failures = failures + 1
      end
    end
    assert.are.equal(2, ok_items)
    assert.are.equal(0, failures)
    -- Without retries, the error is final; raised errors are never retried.
    local tries = 0
    for _, ok, err in pool:map(function() while true do end end, { 1 }, { max_ms = 100 }) do
      tries = tries + 1
      assert.is_false(ok)
      assert.are.equal("Timeout", err.type)
    end
    assert.are.equal(1, tries)
    local n = 0
    for _, ok, err in pool:map(function(p)
      local f = io.open(p, "a") f:write("x") f:close()
      error("no", 0)
    end, { dir .. "/count" }, { retries = 3 }) do
      assert.is_false(ok)
      assert.are.equal("error", err.cause)
      n = n + 1
    end
    assert.are.equal(1, n)
    assert.are.equal("x", H.read_file(dir .. "/count"))
    H.rm_r(dir)
  end)

  it("reports progress as items finish, failures included", function()
    local calls = {}
    for _ in pool:map(function(x) if x % 2 == 0 then error("even") end return x end,
      { 1, 2, 3, 4, 5 }, { on_progress = function(done, failed) calls[#calls + 1] = { done, failed } end }) do
    end
    assert.are.equal(5, #calls)
    assert.are.same({ 5, 2 }, calls[5])
    for k = 2, 5 do assert.is_true(calls[k][1] == calls[k - 1][1] + 1) end
  end)

  it("gives an item that cannot run its reject, and goes on", function()
    local small = handler.pool{ max_workers = 1, max_memory_bytes = 1024 * 1024 }
    local out = collect(small:map(function(x) return x end, { 1, 2 }, { max_heap_bytes = 2 * 1024 * 1024 }))
    assert.are.equal(2, #out)
    assert.is_false(out[1].ok)
    assert.are.equal("InsufficientMemory", out[1].a.type)
    small:close()
  end)

  it("names a bad argument or option", function()
    local cases = {
      { function() return pool:map(nil, {}) end, "bad argument #1 to 'map' %(function expected, got nil%)" },
      { function() return pool:map(print, 5) end, "bad argument #2 to 'map' %(array or iterator function expected, got number%)" },
      { function() return pool:map(print, {}, { window = 0 }) end, "map: bad option 'window'" },
      { function() return pool:map(print, {}, { retries = -1 }) end, "map: bad option 'retries'" },
      { function() return pool:map(print, {}, { ordered = 1 }) end, "map: bad option 'ordered'" },
      { function() return pool:map(print, {}, { args = {} }) end, "map: unknown option 'args'" },
      { function() return handler.map(print, {}, { max_ms = -1 }) end, "map: bad option 'max_ms'" },
    }
    for _, c in ipairs(cases) do
      local ok, err = pcall(c[1])
      assert.is_false(ok)
      assert.matches(c[2], err)
    end
  end)

  it("runs in the default pool as handler.map", function()
    local sum = 0
    for _, ok, v in handler.map(function(x) return x + 1 end, { 1, 2, 3 }) do
      assert.is_true(ok)
      sum = sum + v
    end
    assert.are.equal(9, sum)
  end)
end)
