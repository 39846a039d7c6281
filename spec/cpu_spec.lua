-- cpu_spec.lua: max_cpu_ms, the limit on a job's CPU time: CPUTimeout for a
-- busy job whose wall time is well under max_ms, none for a job that waits.
local handler = require("handler")
local H = require("spec.support.helpers")

describe("max_cpu_ms", function()
  local pool
  H.leak_checked()
  before_each(function() pool = handler.pool{ max_workers = 2 } end)
  after_each(function() pool:close() end)

  it("ends a busy job as CPUTimeout, long before its max_ms", function()
    local t0 = H.now()
    local ok, err = pool:run(function() while true do end end, { max_cpu_ms = 100, max_ms = 10000 })
    local took = H.now() - t0
    assert.is_false(ok)
    assert.are.equal("CPUTimeout", err.type)
    assert.are.equal("Used more than 100ms of CPU time", err.message)
    assert.are.equal("Used more than 100ms of CPU time", tostring(err))
    assert.is_true(took >= 0.09, "took " .. took)
    -- A busy job's CPU time keeps up with the wall clock, give or take a
    -- loaded machine: well under the 10 s of max_ms.
    assert.is_true(took < 0.1 + H.KILL_GRACE_S + 1, "took " .. took)
    assert.are.equal(1, pool:stats().failed_cpu_timeout)
    assert.are.equal(1, pool:stats().failed)
  end)

  it("lets a job that waits take longer than its CPU time in wall time", function()
    local ok, v = pool:run(function()
      local ffi = require("ffi")
      pcall(ffi.cdef, "int poll(void *fds, unsigned long n, int ms);")
      ffi.C.poll(nil, 0, 400)
      return "waited"
    end, { max_cpu_ms = 100 })
    assert.is_true(ok)
    assert.are.equal("waited", v)
  end)

  it("counts from the job's start in a reused worker", function()
    -- The worker burns CPU in a first job; the second's limit is its own.
    assert.is_true((pool:run(function()
      local c = os.clock()
      while os.clock() - c < 0.3 do end
    end)))
    local ok, v = pool:run(function()
      local c = os.clock()
      while os.clock() - c < 0.05 do end
      return "fine"
    end, { max_cpu_ms = 200 })
    assert.is_true(ok, tostring(v))
    assert.are.equal("fine", v)
  end)

  it("works for handler.run and async jobs, and is retried by map", function()
    local ok, err = handler.run(function() while true do end end, { max_cpu_ms = 50 })
    assert.is_false(ok)
    assert.are.equal("CPUTimeout", err.type)
    local job = assert(pool:async(function() while true do end end, { max_cpu_ms = 50 }))
    ok, err = job:await()
    assert.are.equal("CPUTimeout", err.type)
    local tries = 0
    for _, done, e in pool:map(function() while true do end end, { 1 },
      { max_cpu_ms = 50, retries = 2, on_progress = function() tries = tries + 1 end }) do
      assert.is_false(done)
      assert.are.equal("CPUTimeout", e.type)
    end
    assert.are.equal(1, tries)
    -- The async job, and the map's item three times.
    assert.are.equal(4, pool:stats().failed_cpu_timeout)
  end)

  it("refuses a bad value, naming it", function()
    for _, bad in ipairs({ 0, -1, math.huge, 0 / 0, "5" }) do
      local ok, err = pcall(handler.run, print, { max_cpu_ms = bad })
      assert.is_false(ok)
      assert.matches("bad option 'max_cpu_ms' %(expected a positive number of milliseconds", err)
    end
  end)
end)
