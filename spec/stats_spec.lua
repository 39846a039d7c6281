-- stats_spec.lua: job:stats(), once a job is done: its wall, CPU and
-- queued time, the peak of its heap, the bytes of output it wrote.
local handler = require("handler")
local H = require("spec.support.helpers")

describe("job:stats()", function()
  local pool
  H.leak_checked()
  before_each(function() pool = handler.pool{ max_workers = 1 } end)
  after_each(function() pool:close() end)

  it("says what a job cost", function()
    local job = assert(pool:async(function()
      local t = {}
      for i = 1, 100000 do t[i] = i end -- 1 MiB or so of array
      local c = os.clock()
      while os.clock() - c < 0.1 do end
      io.write("12345")
      return #t
    end, { output = "discard" }))
    assert.is_true((job:await()))
    local st = job:stats()
    assert.is_true(st.wall_ms >= 100 and st.wall_ms < 5000, "wall " .. st.wall_ms)
    assert.is_true(st.cpu_ms >= 90 and st.cpu_ms <= st.wall_ms + 5, "cpu " .. st.cpu_ms)
    assert.is_true(st.heap_peak_bytes >= 800000 and st.heap_peak_bytes < 64 * 2^20,
      "heap peak " .. st.heap_peak_bytes)
    assert.are.equal(5, st.output_bytes)
    assert.is_true(st.queued_ms >= 0 and st.queued_ms < 1000, "queued " .. st.queued_ms)
  end)

  it("counts the time a job waited for a worker", function()
    local busy = assert(pool:async(function()
      local c = os.clock()
      while os.clock() - c < 0.3 do end
    end))
    local waiting = assert(pool:async(function() return 1 end, { pool_timeout = 5000 }))
    assert.is_true((waiting:await()))
    busy:await()
    local st = waiting:stats()
    assert.is_true(st.queued_ms >= 150, "queued " .. st.queued_ms)
    assert.is_true(st.cpu_ms < 100, "cpu " .. st.cpu_ms)
  end)

  it("has no CPU time or heap peak for a job that ended without a reply", function()
    local job = assert(pool:async(function() while true do end end, { max_ms = 100 }))
    job:await()
    local st = job:stats()
    assert.is_nil(st.cpu_ms)
    assert.is_nil(st.heap_peak_bytes)
    assert.is_true(st.wall_ms >= 90, "wall " .. st.wall_ms)
  end)

  it("raises before the job is done", function()
    local job = assert(pool:async(function()
      local c = os.clock()
      while os.clock() - c < 0.2 do end
    end))
    local ok, err = pcall(job.stats, job)
    assert.is_false(ok)
    assert.matches("job:stats: the job is not done", err)
    job:await()
    assert.is_table(job:stats())
  end)
end)
