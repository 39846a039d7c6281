-- spec/support/adapter_cases.lua: what every adapter for another event loop
-- (handler.luv, handler.cqueues, handler.copas) must do, checked the same
-- way for each. A spec calls cases(A, L) inside its describe block, with the
-- adapter A and a driver L of its loop:
--   L.name            the adapter's name ("handler.luv")
--   L.spawn(fn)       fn runs in a coroutine of the loop (once the loop runs)
--   L.run(seconds, finished) -> returned: runs the loop until it has nothing
--                     left to do; false when it still had after `seconds`
--                     (finished() says whether the spawned coroutines ended,
--                     for loops whose run never returns by itself)
--   L.ticker()        -> { count = fn, stop = fn }: a repeating 10 ms timer
--                     (or the loop's nearest thing) of the loop, counting
--   L.idle()          -> whether nothing of the adapter is left in the loop
local handler = require("handler")
local H = require("spec.support.helpers")
-- busted gives its globals to spec files, not to the modules they load.
local busted = require("busted")
local assert = require("luassert")
local describe, it, before_each, after_each =
  busted.describe, busted.it, busted.before_each, busted.after_each

local format, pcall, error = string.format, pcall, error

local busy = H.busy_job

local function endless()
  while true do end
end

return function(A, L)
  local N = L.name

  -- Runs each body in a coroutine of the loop, runs the loop, and checks
  -- that every body ended and the loop's run returned (nothing of the
  -- adapter left active). Errors in a body fail the test. Returns seconds.
  local function go(...)
    local bodies = { ... }
    local errs, left = {}, #bodies
    for i = 1, #bodies do
      L.spawn(function()
        local ok, err = pcall(bodies[i])
        if not ok then errs[#errs + 1] = err end
        left = left - 1
      end)
    end
    local t0 = H.now()
    local returned = L.run(10, function() return left == 0 end)
    local took = H.now() - t0
    if errs[1] ~= nil then error(errs[1], 0) end
    assert.are.equal(0, left, "coroutines still waiting when the loop's run returned")
    assert.is_true(returned, "the loop's run did not return: the adapter left something active")
    return took
  end

  local pool
  H.leak_checked()

  before_each(function()
    pool = handler.pool{ max_workers = 24 }
  end)
  after_each(function()
    pool:close()
  end)

  it("returns what job:await() returns: results, Timeout, ProcessExit", function()
    go(function()
      local r = H.pack(A.run(function() return 42, "x", nil, true end))
      assert.are.same({ n = 5, true, 42, "x", nil, true }, r)
    end, function()
      local ok, err = A.run(endless, { max_ms = 50 })
      assert.is_false(ok)
      assert.are.equal("Timeout", err.type)
      assert.are.equal("Took more than 50ms to complete", err.message)
    end, function()
      local ok, err = A.run(function() error("boom") end)
      assert.is_false(ok)
      assert.are.equal("ProcessExit", err.type)
      assert.matches("boom$", err.reason)
      assert.is_string(err.traceback)
    end, function()
      local job = assert(pool:async(function() return "pooled" end))
      assert.are.same({ true, "pooled" }, { A.await(job) })
      assert.are.same({ true, "pooled" }, { job:await() })
    end)
  end)

  it("takes a rejected job as pool:async gives it: false, err", function()
    local full = handler.pool{ max_workers = 0 }
    go(function()
      local ok, err = A.await(full:async(function() return 1 end))
      assert.is_false(ok)
      assert.are.equal("NoWorkersAvailable", err.type)
      assert.is_true(err.rejected)
    end)
    full:close()
  end)

  it("does not block the loop while it waits", function()
    local ticks
    go(function()
      local tick = L.ticker()
      local before = tick.count()
      local r = H.pack(A.run(busy(300)))
      ticks = tick.count() - before
      tick.stop()
      assert.are.same({ n = 2, true, 300 }, r)
    end)
    assert.is_true(ticks >= 10, format("the loop ticked %d times during a 300 ms wait", ticks))
  end)

  it("wakes many coroutines, each with its own job's results", function()
    local got, bodies = {}, {}
    for i = 1, 20 do
      bodies[i] = function()
        local job = assert(pool:async(function()
          local t = os.clock()
          while (os.clock() - t) * 1000 < (i % 5) * 20 do end
          return i, i * 2
        end))
        got[i] = H.pack(A.await(job))
      end
    end
    go(unpack(bodies))
    for i = 1, 20 do
      assert.are.same({ n = 3, true, i, i * 2 }, got[i], "coroutine " .. i)
    end
  end)

  it("wakes every coroutine that waits for the same job", function()
    local job = assert(pool:async(busy(100)))
    local got = {}
    local function waiter(k)
      return function() got[k] = H.pack(A.await(job)) end
    end
    go(waiter(1), waiter(2), waiter(3))
    for k = 1, 3 do assert.are.same({ n = 2, true, 100 }, got[k], "waiter " .. k) end
  end)

  it("returns at once for a job that ended while nobody waited", function()
    local job = assert(pool:async(function() return "early" end))
    assert.is_true(H.wait_until(function() return job:done() end))
    local took
    go(function()
      local t0 = H.now()
      assert.are.same({ true, "early" }, { A.await(job) })
      took = H.now() - t0
    end)
    assert.is_true(took < 0.1, format("took %.3f s", took))
  end)

  it("ends a job at its deadline with only the adapter driving the loop", function()
    local ok, err
    local took = go(function()
      ok, err = A.run(endless, { max_ms = 200 })
    end)
    assert.is_false(ok)
    assert.are.equal("Timeout", err.type)
    assert.is_true(took < 0.8, format("ended %.3f s after it was started, 200 ms deadline", took))
  end)

  it("starts A.run's job in handler.run's pool for its sandbox", function()
    go(function()
      local ok, loaded = A.run(function() return (pcall(require, "ffi")) end, { sandbox = true })
      assert.is_true(ok)
      assert.is_false(loaded)
      assert.are.same({ true, true }, { A.run(function() return (pcall(require, "ffi")) end) })
    end)
  end)

  describe("wait_any", function()
    it("returns the job that ends first and its index", function()
      local slow = assert(pool:async(busy(1500)))
      local fast = assert(pool:async(busy(20)))
      go(function()
        local job, i = A.wait_any({ slow, fast })
        assert.are.equal(fast, job)
        assert.are.equal(2, i)
        assert.is_false(slow:done())
        assert.are.same({ true, 20 }, { fast:await() })
        assert.is_true((pool:kill_by_ref(slow)))
        assert.are.equal("user_killed", select(2, A.await(slow)).reason)
      end)
    end)

    it("returns the lowest index when several are done, and counts failures", function()
      local a = assert(pool:async(function() return "a" end))
      local bad = assert(pool:async(function() error("boom") end))
      go(function()
        A.await(a)
        A.await(bad)
        local job, i = A.wait_any({ bad, a })
        assert.are.equal(bad, job)
        assert.are.equal(1, i)
      end)
    end)

    it("returns nil, \"timeout\" when none ends in time, and the jobs go on", function()
      local job = assert(pool:async(busy(800)))
      local r, took
      go(function()
        local t0 = H.now()
        r = H.pack(A.wait_any({ job }, 100))
        took = H.now() - t0
        assert.are.same({ n = 2, true, 800 }, H.pack(A.await(job)))
      end)
      assert.are.same({ n = 2, nil, "timeout" }, r)
      assert.is_true(took >= 0.09 and took < 0.7, "took " .. took)
    end)

    it("with a timeout of 0 only looks", function()
      local job = assert(pool:async(busy(300)))
      go(function()
        assert.are.same({ nil, "timeout" }, { A.wait_any({ job }, 0) })
        A.await(job)
        local j, i = A.wait_any({ job }, 0)
        assert.are.equal(job, j)
        assert.are.equal(1, i)
      end)
    end)
  end)

  describe("misuse", function()
    -- The message, and that the error points at the caller's line (here).
    local function raises(fn, message)
      local ok, err = pcall(fn)
      assert.is_false(ok)
      assert.is_string(err)
      assert.matches("^[^:]*adapter_cases%.lua:%d+: ", err)
      assert.is_truthy(err:find(message, 1, true), "got: " .. err)
    end

    it("raises, naming the adapter, outside a coroutine of the loop", function()
      local job = assert(pool:async(function() return 1 end))
      raises(function()
        local r = A.await(job)
        return r
      end, N .. ": await must be called from a coroutine")
      raises(function()
        local r = A.run(function() end)
        return r
      end, N .. ": run must be called from a coroutine")
      raises(function()
        local r = A.wait_any({ job })
        return r
      end, N .. ": wait_any must be called from a coroutine")
      -- Nothing was started by the calls that raised.
      assert.are.same({ true, 1 }, { job:await() })
    end)

    it("names a bad argument", function()
      local job = assert(pool:async(function() return 1 end))
      go(function()
        local cases = {
          { function() local r = A.await(42) return r end,
            "bad argument #1 to 'await' (job expected, got number)" },
          { function() local r = A.await(nil) return r end,
            "bad argument #1 to 'await' (job expected, got nil)" },
          { function() local r = A.run(nil) return r end,
            "bad argument #1 to 'run' (function expected, got nil)" },
          { function() local r = A.run(function() end, "x") return r end,
            N .. ".run: options must be a table, got string" },
          { function() local r = A.run(function() end, { max_ms = -1 }) return r end,
            N .. ".run: bad option 'max_ms' (expected a non-negative number of milliseconds" },
          { function() local r = A.run(function() end, { sandbox = "x" }) return r end,
            N .. ".run: bad option 'sandbox'" },
          { function() local r = A.run(function() end, { max_mem = 1 }) return r end,
            N .. ".run: unknown option 'max_mem'" },
          { function() local r = A.wait_any({}) return r end,
            "bad argument #1 to 'wait_any' (non-empty array of jobs expected, got an empty table)" },
          { function() local r = A.wait_any({ job, 42 }) return r end,
            "job expected at index 2, got number" },
          { function() local r = A.wait_any({ job }, -1) return r end,
            "bad argument #2 to 'wait_any' (non-negative number of milliseconds expected, got number)" },
          { function() local r = A.wait_any({ job }, 0 / 0) return r end, "got nan" },
        }
        for _, c in ipairs(cases) do raises(c[1], c[2]) end
        assert.are.same({ true, 1 }, { A.await(job) })
      end)
    end)
  end)

  it("leaves the loop with nothing to do once every job was awaited", function()
    local n = 0
    local took = go(function()
      for _ = 1, 3 do
        if A.run(function() return 1 end) then n = n + 1 end
      end
    end)
    assert.are.equal(3, n)
    assert.is_true(took < 5)
    assert.is_true(L.idle(), N .. " left something in the loop")
  end)
end
