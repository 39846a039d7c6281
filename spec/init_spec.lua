-- init_spec.lua: a pool's init, run once per worker process before its
-- first job; what it leaves is the pristine image every job of the pool
-- starts from, C modules included, and nothing of it taints the worker.
local handler = require("handler")
local H = require("spec.support.helpers")

local has_cjson = pcall(require, "cjson")

describe("a pool's init", function()
  H.leak_checked()

  it("is the image every job starts from: globals, modules, fresh each time", function()
    local pool = handler.pool{ max_workers = 1, init = function()
      RULES = { limit = 3 }
      json_like = require("string")
    end }
    for i = 1, 5 do
      local ok, limit, seen, has = pool:run(function(n)
        local seen = MARK
        MARK = n -- a job's own change goes with it
        return RULES.limit, seen, json_like == string
      end, { args = { i } })
      assert.is_true(ok)
      assert.are.equal(3, limit)
      assert.is_nil(seen)
      assert.is_true(has)
    end
    assert.are.equal(1, pool:stats().processes_started)
    pool:close()
  end)

  it("keeps workers with a C module (cjson) alive over 1,000 items", function()
    if not has_cjson then
      pending("lua-cjson is not installed")
      return
    end
    local pool = handler.pool{ max_workers = 2, init = function() cjson = require("cjson") end }
    local n, nulls = 0, 0
    for _, ok, s, null in pool:map(function(i)
      return cjson.encode({ id = i, tags = { "a" } }), cjson.null
    end, function() n = n + 1 if n <= 1000 then return n end end) do
      assert.is_true(ok, tostring(s))
      assert.matches('"id":%d+', s)
      if null == require("cjson").null then nulls = nulls + 1 end
    end
    assert.are.equal(1000, nulls)
    assert.is_true(pool:stats().processes_started <= 2,
      "processes started: " .. pool:stats().processes_started)
    pool:close()
  end)

  it("does not count what it allocates against a job's heap", function()
    local pool = handler.pool{ max_workers = 1, init = function()
      BIG = {}
      for i = 1, 200000 do BIG[i] = i end
    end }
    local ok, n = pool:run(function() return #BIG end, { max_heap_bytes = 256 * 1024 })
    assert.is_true(ok, tostring(n))
    assert.are.equal(200000, n)
    pool:close()
  end)

  it("that fails makes every job of the pool fail, naming its error", function()
    local pool = handler.pool{ max_workers = 1, init = function() error("no config here", 0) end }
    for _ = 1, 3 do
      local ok, err = pool:run(function() return 1 end)
      assert.is_false(ok)
      assert.are.equal("ProcessExit", err.type)
      assert.are.equal("error", err.cause)
      assert.are.equal("init failed: no config here", err.reason)
    end
    -- Other pools are not affected.
    assert.are.same({ true, 2 }, { handler.run(function() return 2 end) })
    pool:close()
  end)

  it("runs in the sandbox of its pool", function()
    local pool = handler.pool{ max_workers = 1, sandbox = true, init = function()
      GREETING = "hi"
      HAS_IO_OPEN = io.open ~= nil
    end }
    local ok, g, io_open = pool:run(function() return GREETING, HAS_IO_OPEN end)
    assert.is_true(ok, tostring(g))
    assert.are.equal("hi", g)
    assert.is_false(io_open)
    pool:close()
  end)

  it("is checked at handler.pool, naming what is wrong", function()
    local ok, err = pcall(handler.pool, { init = "x" })
    assert.is_false(ok)
    assert.matches("handler.pool: bad option 'init' %(expected a function, got string%)", err)
    local root = handler.pool{}
    ok, err = pcall(handler.pool, { init = function() end, delegate_to = root })
    assert.is_false(ok)
    assert.matches("init is set on root pools", err)
    local u = newproxy()
    ok, err = pcall(handler.pool, { init = function() return u end })
    assert.is_false(ok)
    assert.matches("handler.pool: init handler: cannot send a userdata: upvalue 'u'", err)
    root:close()
  end)
end)
