-- loop_spec.lua: the loop a host can drive: handler.fd(), handler.timeout()
-- and handler.step(), and jobs run to completion with no blocking call.
local handler = require("handler")
local H = require("spec.support.helpers")

local tostring = tostring

-- Drives the loop the way a host event loop would: wait for the fd (up to
-- handler.timeout(), capped), then step; until done() or the deadline.
local function drive(done, seconds)
  return H.wait_until(function()
    if done() then return true end
    local t = handler.timeout()
    if t < 0 or t > 50 then t = 50 end
    H.readable(handler.fd(), t)
    handler.step()
    return done()
  end, seconds or 5)
end

describe("the host-driven loop", function()
  local pool
  H.leak_checked()

  before_each(function()
    pool = handler.default_pool()
  end)

  it("handler.fd() is a pollable fd", function()
    local fd = handler.fd()
    assert.is_number(fd)
    assert.is_true(fd >= 0)
    assert.are.equal(fd, math.floor(fd))
    assert.is_true(H.contains(H.open_fds(), fd))
    -- Polling it does not fail; with nothing pending it may or may not be ready.
    H.readable(fd, 0)
    assert.are.equal(fd, handler.fd())
  end)

  it("handler.timeout() is a number of milliseconds, or -1 for none", function()
    local t = handler.timeout()
    assert.is_number(t)
    assert.is_true(t == -1 or t >= 0, "timeout " .. tostring(t))
  end)

  it("handler.timeout() reflects a running job's time limit", function()
    local job = assert(pool:async(function() while true do end end, { max_ms = 3000 }))
    -- Once the job runs, its time limit is the loop's next deadline (or an earlier one).
    local t
    assert.is_true(H.wait_until(function()
      t = handler.timeout()
      return t >= 0 and t <= 3000
    end), "timeout " .. tostring(t))
    assert.is_true((pool:kill_by_ref(job)))
    local ok, err = job:await()
    assert.is_false(ok)
    assert.are.equal("ProcessExit", err.type)
    assert.are.equal("user_killed", err.reason)
  end)

  it("handler.step() returns at once when nothing is pending", function()
    local t0 = H.now()
    for _ = 1, 10 do handler.step() end
    assert.is_true(H.now() - t0 < 1)
  end)

  it("handler.step() returns at once while a job runs", function()
    local job = assert(pool:async(function() while true do end end, { max_ms = 2000 }))
    local t0 = H.now()
    for _ = 1, 10 do handler.step() end
    assert.is_true(H.now() - t0 < 1)
    assert.is_false(job:done())
    assert.is_true((pool:kill_by_ref(job)))
    assert.is_false((job:await()))
  end)

  it("drives an async job to completion by steps alone", function()
    local job = assert(pool:async(function() return "stepped", 42 end))
    assert.is_true(drive(function() return job:done() end), "the job never finished")
    local t0 = H.now()
    local ok, a, b = job:await()
    assert.is_true(H.now() - t0 < 1)
    assert.is_true(ok)
    assert.are.equal("stepped", a)
    assert.are.equal(42, b)
  end)

  it("drives several jobs and every outcome by steps alone", function()
    local jobs = {
      assert(pool:async(function() return 1 end)),
      assert(pool:async(function() error("raised") end)),
      assert(pool:async(function() while true do end end, { max_ms = 50 })),
      assert(pool:async(function() local t = {} for i = 1, 1e7 do t[i] = i end end,
        { max_heap_bytes = 4096 })),
      assert(pool:async(function() os.exit(4) end)),
    }
    assert.is_true(drive(function()
      for _, job in ipairs(jobs) do
        if not job:done() then return false end
      end
      return true
    end), "some job never finished")
    local ok, v = jobs[1]:await()
    assert.is_true(ok)
    assert.are.equal(1, v)
    local expect = { nil, "ProcessExit", "Timeout", "OOM", "ProcessExit" }
    for i = 2, 5 do
      local ok_i, err = jobs[i]:await()
      assert.is_false(ok_i)
      assert.are.equal(expect[i], err.type)
    end
    assert.are.equal("exit 4", select(2, jobs[5]:await()).reason)
  end)

  it("wakes the fd when a job finishes", function()
    local job = assert(pool:async(function() return "ready" end))
    -- Poll the fd (not sleep) until the job is done: each wake-up steps the loop.
    local woke = 0
    local deadline = H.now() + 5
    while not job:done() and H.now() < deadline do
      if H.readable(handler.fd(), 100) then woke = woke + 1 end
      handler.step()
    end
    assert.is_true(job:done())
    assert.is_true(woke > 0)
    assert.are.same({ true, "ready" }, { job:await() })
  end)
end)
