-- wait_spec.lua: waiting for the first of several jobs (handler.wait_any),
-- and a host that waits on handler.fd() alone: it becomes readable when a
-- deadline passes, not only when a reply arrives.
local handler = require("handler")
local H = require("spec.support.helpers")

local sleeper = H.busy_job

describe("handler.wait_any", function()
  local pool
  H.leak_checked()

  before_each(function()
    pool = handler.pool{ max_workers = 4 }
  end)
  after_each(function()
    pool:close()
  end)

  it("returns the job that ends first and its index", function()
    local slow = assert(pool:async(sleeper(1500)))
    local fast = assert(pool:async(sleeper(20)))
    local job, i = handler.wait_any({ slow, fast })
    assert.are.equal(fast, job)
    assert.are.equal(2, i)
    assert.is_true(fast:done())
    assert.is_false(slow:done())
    assert.are.same({ true, 20 }, { fast:await() })
    pool:kill_by_ref(slow)
  end)

  it("returns the lowest index when several are done", function()
    local a = assert(pool:async(function() return "a" end))
    local b = assert(pool:async(function() return "b" end))
    assert.is_true(select(1, a:await()))
    assert.is_true(select(1, b:await()))
    local job, i = handler.wait_any({ b, a })
    assert.are.equal(b, job)
    assert.are.equal(1, i)
  end)

  it("returns nil, \"timeout\" when none ends in time, and the jobs go on", function()
    local job = assert(pool:async(sleeper(800)))
    local t0 = H.now()
    local r, why = handler.wait_any({ job }, 100)
    local took = H.now() - t0
    assert.is_nil(r)
    assert.are.equal("timeout", why)
    assert.is_true(took >= 0.09 and took < 0.7, "took " .. took)
    assert.are.same({ true, 800 }, { job:await() })
  end)

  it("with a timeout of 0 only looks", function()
    local job = assert(pool:async(sleeper(500)))
    assert.are.same({ nil, "timeout" }, { handler.wait_any({ job }, 0) })
    job:await()
  end)

  it("counts failures as done", function()
    local bad = assert(pool:async(function() error("boom") end))
    local slow = assert(pool:async(sleeper(1000)))
    local job, i = handler.wait_any({ slow, bad })
    assert.are.equal(2, i)
    local ok, err = job:await()
    assert.is_false(ok)
    assert.are.equal("ProcessExit", err.type)
    pool:kill_by_ref(slow)
  end)

  it("names a bad argument", function()
    local job = assert(pool:async(function() return 1 end))
    local cases = {
      { { nil }, "#1 to 'wait_any' %(non%-empty array of jobs expected, got nil%)" },
      { { {} }, "got an empty table" },
      { { { job, 42 } }, "job expected at index 2, got number" },
      { { { job }, -1 }, "#2 to 'wait_any' %(non%-negative number of milliseconds expected, got number%)" },
      { { { job }, 0 / 0 }, "got nan" },
      { { { job }, "5" }, "got string" },
    }
    for _, c in ipairs(cases) do
      local ok, err = pcall(function()
        local r = handler.wait_any(unpack(c[1], 1, 2))
        return r
      end)
      assert.is_false(ok)
      assert.matches(c[2], err)
      assert.matches("^[^:]*wait_spec.lua:%d+: ", err)
    end
    job:await()
  end)
end)

describe("handler.fd()", function()
  H.leak_checked()

  -- A host that waits on the descriptor alone: each wait is long (3 s), so
  -- a descriptor that missed a deadline shows as a job ending seconds late.
  local function drive_by_fd(job, seconds)
    local t0 = H.now()
    while not job:done() do
      if H.now() - t0 > seconds then return false end
      H.readable(handler.fd(), 3000)
      handler.step()
    end
    return true
  end

  -- Killing a worker takes a few ms; a missed deadline costs 3 s.
  local function assert_on_time(took, ms)
    assert.is_true(took < ms / 1000 + 0.6, ("ended %.3f s after a %d ms deadline"):format(took, ms))
  end

  it("becomes readable when a job's deadline passes", function()
    local t0 = H.now()
    local job = assert(handler.default_pool():async(function() while true do end end,
      { max_ms = 200 }))
    assert.is_true(drive_by_fd(job, 10))
    local took = H.now() - t0
    local ok, err = job:await()
    assert.is_false(ok)
    assert.are.equal("Timeout", err.type)
    assert_on_time(took, 200)
  end)

  it("becomes readable when a queued job's pool_timeout passes", function()
    local pool = handler.pool{ max_workers = 1 }
    local busy = assert(pool:async(function() while true do end end, { max_ms = 5000 }))
    local t0 = H.now()
    local queued = assert(pool:async(function() return 1 end, { pool_timeout = 150 }))
    assert.is_true(drive_by_fd(queued, 10))
    local took = H.now() - t0
    local ok, err = queued:await()
    assert.is_false(ok)
    assert.are.equal("PoolTimeout", err.type)
    assert.is_true(took >= 0.14, "took " .. took)
    assert_on_time(took, 150)
    pool:kill_by_ref(busy)
    pool:close()
  end)

  it("wakes a host for many jobs and deadlines in turn", function()
    local pool = handler.pool{ max_workers = 4 }
    local jobs = {}
    for i = 1, 4 do
      jobs[i] = assert(pool:async(function() while true do end end, { max_ms = 50 * i }))
    end
    local t0 = H.now()
    for i = 1, 4 do assert.is_true(drive_by_fd(jobs[i], 10)) end
    assert_on_time(H.now() - t0, 200)
    for i = 1, 4 do
      local ok, err = jobs[i]:await()
      assert.is_false(ok)
      assert.are.equal("Timeout", err.type)
    end
    pool:close()
  end)
end)
