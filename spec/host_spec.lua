-- spec/host_spec.lua: living inside someone else's process: a host that
-- reaps every child itself, as nginx does, and a host that runs the loop
-- late, past a job's deadline.
local H = require("spec.support.helpers")
local handler = require("handler")

describe("a host like nginx", function()
  it("reaps every child itself with waitpid(-1): jobs still resolve with their cause", function()
    local out = H.run_host([[
      local ffi = require("ffi")
      ffi.cdef("int waitpid(int pid, int *status, int options);")
      local handler = require("handler")
      -- The host reaps whatever child has exited, at every turn, as nginx's
      -- SIGCHLD handler does.
      local reaped = 0
      local function reap()
        while ffi.C.waitpid(-1, nil, 1) > 0 do reaped = reaped + 1 end
      end
      local pool = handler.pool({ max_workers = 4 })
      local function drive(fn, opts)
        local job = assert(pool:async(fn, opts))
        while not job:done() do
          reap()
          handler.step()
          ffi.C.waitpid(-1, nil, 1)
        end
        return job:await()
      end
      local function show(label, ok, a)
        print(label, ok, type(a) == "table" and (a.reason or a.type) or a)
      end
      show("ok", drive(function() return 42 end))
      show("segv", drive(function() local f = require("ffi") f.cast("int *", 0)[0] = 1 end))
      show("exit", drive(function() os.exit(3) end))
      show("timeout", drive(function() while true do end end, { max_ms = 50 }))
      -- Kill the supervisor: the host's reaper takes it, we still recover.
      local sup = handler._core.procs().supervisor
      os.execute("kill -9 " .. sup)
      for _ = 1, 100 do reap() handler.step() os.execute("sleep 0.01") end
      show("after", drive(function() return "recovered" end))
      print("supervisor replaced", handler._core.procs().supervisor ~= sup)
    ]])
    H.assert_has_all(out, {
      "ok\ttrue\t42",
      "segv\tfalse\tSIGSEGV",
      "exit\tfalse\texit 3",
      "timeout\tfalse\tTimeout",
      "after\ttrue\trecovered",
      "supervisor replaced\ttrue",
    })
  end)
end)

describe("a host that runs the loop late", function()
  local pool

  before_each(function()
    pool = handler.pool({ max_workers = 2 })
  end)

  after_each(function()
    pool:close()
  end)

  it("gets the result a worker wrote before the deadline was handled", function()
    local job = assert(pool:async(function() return "in time" end, { max_ms = 50 }))
    -- The reply is written within microseconds; the host looks only after
    -- four times the deadline.
    H.sleep_ms(200)
    local ok, v = job:await()
    assert.is_true(ok)
    assert.are.equal("in time", v)
  end)

  it("gets a Timeout, and only that, when the worker had not replied", function()
    local job = assert(pool:async(function() while true do end end, { max_ms = 50 }))
    H.sleep_ms(200)
    local ok, err = job:await()
    assert.is_false(ok)
    assert.are.equal("Timeout", err.type)
    -- Resolved once: awaiting again gives the same outcome.
    local ok2, err2 = job:await()
    assert.is_false(ok2)
    assert.are.equal("Timeout", err2.type)
    assert.are.equal(0, pool:stats().running)
  end)
end)
