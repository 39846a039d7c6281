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

  it("yields all the results of an item that returns many, batched or not", function()
    for _, batch in ipairs({ 1, 4 }) do
      local progress = {}
      local got = {}
      for i, ok, a, b, c, d in pool:map(function(x) return x, 2 * x, 3 * x, nil end,
          { 1, 2, 3, 4, 5, 6 }, { batch = batch, on_progress = function(done, failed)
            progress[#progress + 1] = done .. "/" .. failed
          end }) do
        got[i] = { ok, a, b, c, d }
      end
      for k = 1, 6 do assert.are.same({ true, k, 2 * k, 3 * k, nil }, got[k]) end
      assert.are.equal("6/0", progress[#progress])
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
      { function() return pool:map(print, {}, { batch = 0 }) end, "map: bad option 'batch'" },
      { function() return pool:map(print, {}, { batch = 1.5 }) end, "map: bad option 'batch'" },
      { function() return pool:map(print, {}, { batch = 1025 }) end, "map: bad option 'batch'" },
      { function() return pool:map(print, {}, { batch = 4, output = "capture" }) end,
        "bad argument #3 to 'map' %(batch > 1 takes neither output = \"capture\"" },
      { function() return pool:map(print, {}, { batch = 4, on_event = print }) end,
        "bad argument #3 to 'map' %(batch > 1 takes neither" },
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

describe("pool:map with batch", function()
  local pool
  H.leak_checked()
  before_each(function() pool = handler.pool{ max_workers = 2 } end)
  after_each(function() pool:close() end)

  it("sends several items to a worker at once, each from a fresh state", function()
    local inputs = {}
    for k = 1, 300 do inputs[k] = k end
    local n = 0
    for i, ok, v, seen in pool:map(function(x)
      local before = LEFT_BY_ANOTHER_ITEM
      LEFT_BY_ANOTHER_ITEM = x
      return x * 2, before
    end, inputs, { batch = 64 }) do
      n = n + 1
      assert.are.equal(n, i)
      assert.is_true(ok)
      assert.are.equal(2 * i, v)
      assert.is_nil(seen)
    end
    assert.are.equal(300, n)
    local st = pool:stats()
    -- Fewer jobs than items: items went several to a job, on the same two
    -- workers.
    assert.is_true(st.started < 300, st.started .. " jobs for 300 items")
    assert.are.equal(2, st.processes_started)
  end)

  it("costs a hang, a crash, an exit, an OOM and a raise only their own item", function()
    local poison = { [5] = "hang", [9] = "crash", [13] = "exit", [17] = "alloc", [21] = "raise" }
    local inputs = {}
    for k = 1, 40 do inputs[k] = poison[k] or k end
    local t0 = H.now()
    local outcomes = {}
    for i, ok, v in pool:map(function(x)
      if x == "hang" then while true do end end
      if x == "crash" then require("ffi").cast("int *", 0)[0] = 1 end
      if x == "exit" then os.exit(7) end
      if x == "alloc" then
        local t = {}
        while true do t[#t + 1] = { x } end
      end
      if x == "raise" then error("bad item", 0) end
      return x
    end, inputs, { batch = 16, max_ms = 500, max_heap_bytes = 8 * 2^20 }) do
      outcomes[i] = ok and v or v
    end
    local elapsed = H.now() - t0
    for k = 1, 40 do
      if not poison[k] then assert.are.equal(k, outcomes[k]) end
    end
    assert.are.equal("Timeout", outcomes[5].type)
    assert.are.equal("ProcessExit", outcomes[9].type)
    assert.are.equal("signal", outcomes[9].cause)
    assert.are.equal("ProcessExit", outcomes[13].type)
    assert.are.equal("exit", outcomes[13].cause)
    assert.are.equal("OOM", outcomes[17].type)
    assert.are.equal("ProcessExit", outcomes[21].type)
    assert.are.equal("error", outcomes[21].cause)
    -- One hang's limit, not one per item behind it: generous for a busy
    -- machine, far below 36 items waiting out 500 ms each.
    assert.is_true(elapsed < 5, "took " .. elapsed .. " s")
  end)

  it("gives each item of a batch its own max_ms and max_cpu_ms", function()
    local spin = function(ms)
      local c = os.clock()
      while (os.clock() - c) * 1000 < ms do end
      return ms
    end
    -- Ten items of 60 ms in one job: 600 ms together, each within its own
    -- 300 ms.
    local inputs = {}
    for k = 1, 10 do inputs[k] = 60 end
    inputs[11] = 2000
    local p1 = handler.pool{ max_workers = 1 }
    local got = {}
    for i, ok, v in p1:map(spin, inputs, { batch = 16, max_ms = 5000, max_cpu_ms = 300 }) do
      got[i] = ok and v or v.type
    end
    p1:close()
    for k = 1, 10 do assert.are.equal(60, got[k]) end
    assert.are.equal("CPUTimeout", got[11])
    local got2 = {}
    local p2 = handler.pool{ max_workers = 1 }
    for i, ok, v in p2:map(spin, inputs, { batch = 16, max_ms = 300 }) do
      got2[i] = ok and v or v.type
    end
    p2:close()
    for k = 1, 10 do assert.are.equal(60, got2[k]) end
    assert.are.equal("Timeout", got2[11])
  end)

  it("runs the items after a dead one again, and retries only the dead one", function()
    local dir = H.tmpdir()
    local inputs = {}
    for k = 1, 12 do inputs[k] = k end
    local p1 = handler.pool{ max_workers = 1 }
    local ok_items = 0
    for i, ok, v in p1:map(function(x)
      local f = assert(io.open(dir .. "/runs", "a"))
      f:write(x, "\n")
      f:close()
      if x == 4 then while true do end end
      return x
    end, inputs, { batch = 16, max_ms = 200, retries = 1 }) do
      if ok then ok_items = ok_items + 1 end
      if i == 4 then assert.are.equal("Timeout", v.type) end
    end
    p1:close()
    assert.are.equal(11, ok_items)
    local runs = {}
    for l in io.lines(dir .. "/runs") do runs[tonumber(l)] = (runs[tonumber(l)] or 0) + 1 end
    for k = 1, 12 do assert.are.equal(k == 4 and 2 or 1, runs[k], "item " .. k) end
    H.rm_r(dir)
  end)
end)

describe("pool:map with batch, in a pool whose workers serve one job each", function()
  H.leak_checked()

  it("runs every item once, each in a job of its own", function()
    local pool = handler.pool{ max_workers = 2, sandbox = "syscalls" }
    local inputs = {}
    for k = 1, 30 do inputs[k] = k end
    local n = 0
    for i, ok, v in pool:map(function(x) return x + 1 end, inputs, { batch = 16 }) do
      n = n + 1
      assert.is_true(ok, tostring(v))
      assert.are.equal(i + 1, v)
    end
    assert.are.equal(30, n)
    -- A worker of this profile runs one item and exits: the items after it
    -- in its job went back to the queue, and none ran twice.
    local st = pool:stats()
    assert.are.equal(30, st.started)
    assert.are.equal(30, st.succeeded)
    pool:close()
  end)
end)
