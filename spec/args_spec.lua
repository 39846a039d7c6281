-- args_spec.lua: the args option (a job's arguments travel under the rules
-- of upvalues) and the cause of every ProcessExit.
local handler = require("handler")
local H = require("spec.support.helpers")

describe("the args option", function()
  local pool
  H.leak_checked()
  before_each(function() pool = handler.pool{ max_workers = 2 } end)
  after_each(function() pool:close() end)

  it("passes arguments to the function, in every run method", function()
    local function add(a, b) return a + b end
    assert.are.same({ true, 5 }, { handler.run(add, { args = { 2, 3 } }) })
    assert.are.same({ true, 7 }, { pool:run(add, { args = { 3, 4 } }) })
    local job = assert(pool:async(add, { args = { 4, 5 } }))
    assert.are.same({ true, 9 }, { job:await() })
    assert.are.same({ true, 11 }, { handler.await(assert(pool:async(add, { args = { 5, 6 } }))) })
  end)

  it("keeps nils and the count with args.n", function()
    local ok, n, a, b, c = handler.run(function(...) return select("#", ...), ... end,
      { args = { n = 3, nil, "x" } })
    assert.is_true(ok)
    assert.are.equal(3, n)
    assert.is_nil(a)
    assert.are.equal("x", b)
    assert.is_nil(c)
    assert.are.same({ true, 0 }, { handler.run(function(...) return select("#", ...) end,
      { args = {} }) })
  end)

  it("carries tables, shared references and functions like upvalues", function()
    local shared = { 1, 2 }
    local ok, same, twice = pool:run(function(t, u, f) return t == u, f(t[1]) end,
      { args = { shared, shared, function(x) return x * 2 end } })
    assert.is_true(ok)
    assert.is_true(same)
    assert.are.equal(2, twice)
    local mod_ok, v = handler.run(function(fmt) return fmt("%03d", 7) end,
      { args = { string.format } })
    assert.is_true(mod_ok)
    assert.are.equal("007", v)
  end)

  it("names an argument that cannot travel, in the caller", function()
    local ok, err = pcall(handler.run, function() end, { args = { 1, coroutine.create(print) } })
    assert.is_false(ok)
    assert.matches("cannot send a thread: argument #2", err)
    ok, err = pcall(pool.run, pool, function() end, { args = { { a = { newproxy() } } } })
    assert.is_false(ok)
    assert.matches("cannot send a userdata: argument #1", err)
    -- The pool goes on.
    assert.are.same({ true, 1 }, { pool:run(function(x) return x end, { args = { 1 } }) })
  end)

  it("refuses a bad args option, naming it", function()
    for _, bad in ipairs({ 5, "x", { n = -1 }, { n = 1.5 }, { n = 5000 } }) do
      local ok, err = pcall(handler.run, function() end, { args = bad })
      assert.is_false(ok)
      assert.matches("handler.run: bad option 'args' %(expected a table of arguments", err)
      ok, err = pcall(pool.async, pool, function() end, { args = bad })
      assert.is_false(ok)
      assert.matches("pool:async: bad option 'args'", err)
    end
  end)

  it("counts the arguments against the job's heap", function()
    local big = {}
    for i = 1, 20000 do big[i] = i end
    local ok, err = pool:run(function(t) return #t end, { args = { big }, max_heap_bytes = 65536 })
    assert.is_false(ok)
    assert.are.equal("OOM", err.type)
  end)
end)

describe("a ProcessExit's cause", function()
  local pool
  H.leak_checked()
  before_each(function() pool = handler.pool{ max_workers = 2 } end)
  after_each(function() pool:close() end)

  local function cause_of(fn, opts)
    local ok, err = pool:run(fn, opts)
    assert.is_false(ok)
    assert.are.equal("ProcessExit", err.type)
    return err.cause, err.reason
  end

  it("is error, exit, signal, killed or lost", function()
    assert.are.same({ "error", "boom" }, { cause_of(function() error("boom", 0) end) })
    assert.are.same({ "exit", "exit 3" }, { cause_of(function() os.exit(3) end) })
    assert.are.same({ "signal", "SIGSEGV" },
      { cause_of(function() require("ffi").cast("int *", 0)[0] = 1 end) })
    assert.are.same({ "killed", "output limit" },
      { cause_of(function() io.write(string.rep("x", 100000)) io.flush() end,
        { max_output_bytes = 10 }) })
    local job = assert(pool:async(function() while true do end end))
    pool:kill_by_ref(job)
    local _, err = job:await()
    assert.are.equal("killed", err.cause)
    assert.are.equal("user_killed", err.reason)
    assert.are.equal("error", (cause_of(function() return coroutine.create(print) end)))
  end)

  it("is lost when the worker vanishes under the job", function()
    local job = assert(pool:async(function() while true do end end, { max_ms = 10000 }))
    local pid
    assert.is_true(H.wait_until(function()
      pid = H.workers()[1]
      return pid ~= nil
    end))
    local sup = handler._core.procs().supervisor
    H.kill9(sup)
    local _, err = job:await()
    assert.are.equal("ProcessExit", err.type)
    assert.are.equal("lost", err.cause)
  end)
end)
