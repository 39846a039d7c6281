-- events_spec.lua: progress from inside a job: require("handler.job").emit
-- sends a value to the caller's on_event, called while the caller waits;
-- every event of a job is delivered before its await returns.
local handler = require("handler")
local H = require("spec.support.helpers")

describe("events", function()
  local pool
  H.leak_checked()
  before_each(function() pool = handler.pool{ max_workers = 2 } end)
  after_each(function() pool:close() end)

  it("reach on_event in order, all before await returns", function()
    local got = {}
    local job = assert(pool:async(function()
      local job = require("handler.job")
      for i = 1, 5 do job.emit({ step = i, of = 5 }) end
      job.emit("last")
      return "done"
    end, { on_event = function(v) got[#got + 1] = v end }))
    assert.are.same({ true, "done" }, { job:await() })
    assert.are.equal(6, #got)
    for i = 1, 5 do assert.are.same({ step = i, of = 5 }, got[i]) end
    assert.are.equal("last", got[6])
  end)

  it("are delivered while the job runs, not at its end", function()
    local t0, first = H.now(), nil
    local ok = pool:run(function()
      require("handler.job").emit("started")
      local c = os.clock()
      while os.clock() - c < 0.5 do end
      return 1
    end, { on_event = function() first = first or H.now() - t0 end })
    local took = H.now() - t0
    assert.is_true(ok)
    assert.is_not_nil(first)
    assert.is_true(first < took - 0.3, ("first event at %.3f s, job done at %.3f s"):format(first, took))
  end)

  it("work from handler.run, and before an error", function()
    local got = {}
    local ok, err = handler.run(function()
      require("handler.job").emit(1)
      error("boom", 0)
    end, { on_event = function(v) got[#got + 1] = v end })
    assert.is_false(ok)
    assert.are.equal("boom", err.reason)
    assert.are.same({ 1 }, got)
  end)

  it("work in every sandbox profile", function()
    for _, profile in ipairs({ true, "syscalls" }) do
      local got
      local ok, v = handler.run(function()
        require("handler.job").emit("from " .. tostring(1))
        return 2
      end, { sandbox = profile, on_event = function(e) got = e end })
      assert.is_true(ok, tostring(v))
      assert.are.equal("from 1", got)
    end
  end)

  it("raise in the job when the value cannot travel", function()
    local ok, err = pool:run(function()
      require("handler.job").emit(coroutine.create(print))
    end, { on_event = function() end })
    assert.is_false(ok)
    assert.matches("cannot send a thread", err.reason)
  end)

  it("are bounded by max_result_bytes together", function()
    local ok, err = pool:run(function()
      local emit = require("handler.job").emit
      for _ = 1, 100 do emit(string.rep("x", 1000)) end
      return 1
    end, { max_result_bytes = 10000, on_event = function() end })
    assert.is_false(ok)
    assert.matches("events larger than max_result_bytes", err.reason)
  end)

  it("wait for a caller that does not listen, and do not disturb it", function()
    local job = assert(pool:async(function()
      require("handler.job").emit("nobody listens")
      return 3
    end))
    assert.are.same({ true, 3 }, { job:await() })
    local j2, i = handler.wait_any({ assert(pool:async(function()
      require("handler.job").emit("x")
      local c = os.clock()
      while os.clock() - c < 0.2 do end
      return 4
    end)) })
    assert.are.equal(1, i)
    assert.is_true(j2:done())
  end)

  it("raise from on_event in the caller", function()
    local job = assert(pool:async(function()
      require("handler.job").emit("x")
      return 1
    end, { on_event = function() error("listener broke", 0) end }))
    local ok, err = pcall(job.await, job)
    assert.is_false(ok)
    assert.are.equal("listener broke", err)
    -- The job itself still ends; awaiting again returns its outcome.
    assert.are.same({ true, 1 }, { job:await() })
  end)

  it("refuse a bad on_event, naming it", function()
    local ok, err = pcall(handler.run, print, { on_event = "x" })
    assert.is_false(ok)
    assert.matches("bad option 'on_event' %(expected a function, got string%)", err)
  end)
end)
