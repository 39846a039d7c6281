-- travel_host_spec.lua: what a job's closure may take from its host, as
-- docs/API.md ("What travels") gives it: values of modules that exist only
-- in the host raise in the caller (nginx's ngx and ndk, simulated here by
-- modules put in package.loaded and by preload functions), modules on
-- package.path and package.cpath travel by name, values a host layer
-- refused (handler._refuse, for ngx.ctx) raise, and the NULL light userdata
-- (cjson.null, ngx.null) travels as itself both ways.
local handler = require("handler")
local H = require("spec.support.helpers")

local run, core = handler.run, handler._core
local pcall, type, tostring, rawequal, setmetatable, next =
  pcall, type, tostring, rawequal, setmetatable, next
local format = string.format

-- Where a function is defined, as the encoder's messages show it.
local function where(f)
  local info = debug.getinfo(f, "S")
  return info.short_src .. ":" .. info.linedefined
end

-- The error a call raised, asserting it raised one.
local function raised(fn, ...)
  local ok, err = pcall(fn, ...)
  assert.is_false(ok, "expected an error to be raised")
  return err
end

-- The started counter of the default pool: whether a call reached a worker.
local function started()
  return handler.default_pool():stats().started
end

-- Asserts that run(fn) raises `msg` in the caller and starts no job, and
-- that jobs still run afterwards.
local function refused_in_caller(msg, fn, opts)
  local before = started()
  assert.equals(msg, raised(run, fn, opts))
  assert.equals(before, started())
  local ok, v = run(function() return 1 + 1 end)
  assert.is_true(ok, tostring(v))
  assert.equals(2, v)
end

-- The tail of the message about a module that exists only in this process.
local function host_only(mod)
  return format("module '%s', which exists only in this process "
    .. "(it is not on package.path or package.cpath)", mod)
end

-- The NULL light userdata, as cjson.null is; made by the decoder, so that
-- the specs need no C module.
local NULL = core.decode("\1\13")

describe("the NULL light userdata in jobs", function()
  H.leak_checked()

  it("is cjson.null", function()
    local ok, cjson = pcall(require, "cjson")
    if ok then assert.is_true(rawequal(cjson.null, NULL)) end
    assert.equals("userdata: NULL", tostring(NULL))
  end)

  for _, sandbox in ipairs({ false, "syscalls", "strict" }) do
    it("travels as itself both ways, as a value and a key (sandbox " .. tostring(sandbox) .. ")",
      function()
        local held = { NULL, [NULL] = "key" }
        local ok, v, t, seen = run(function()
          return NULL, { NULL, [NULL] = NULL }, held[1] == NULL and held[NULL] == "key"
        end, { sandbox = sandbox })
        assert.is_true(ok, tostring(v))
        assert.is_true(rawequal(NULL, v))
        assert.is_true(rawequal(NULL, t[1]))
        assert.is_true(rawequal(NULL, t[NULL]))
        assert.is_true(seen)
      end)
  end

  it("comes back from a job's own cjson.null to a host that has not loaded cjson", function()
    if not pcall(require, "cjson") then return pending("lua-cjson is not installed") end
    local saved = package.loaded.cjson
    package.loaded.cjson = nil
    finally(function() package.loaded.cjson = saved end)
    local ok, v, t = run(function()
      local null = require("cjson").null
      return null, { null }
    end)
    assert.is_true(ok, tostring(v))
    assert.is_true(rawequal(NULL, v))
    assert.is_true(rawequal(NULL, t[1]))
  end)

  it("is the only light userdata that travels without a name", function()
    local light = debug.upvalueid(function() return NULL end, 1)
    local ok, err = pcall(run, function() return light end)
    assert.is_false(ok)
    assert.matches("^handler: cannot send a userdata: upvalue 'light' of function at ", err)
  end)
end)

describe("values of modules that exist only in this process", function()
  H.leak_checked()
  local fakehost

  setup(function()
    -- What nginx does for ngx and ndk: a module put in package.loaded by
    -- the host itself, under a name no path finds.
    fakehost = { f = function() return 1 end, t = { 1, 2 } }
    package.loaded.hd_travel_fakehost = fakehost
  end)

  teardown(function()
    package.loaded.hd_travel_fakehost = nil
  end)

  it("raise in the caller, naming the upvalue and the module", function()
    local fn = function() return fakehost end
    refused_in_caller("handler: cannot send a table: upvalue 'fakehost' of function at "
      .. where(fn) .. " is " .. host_only("hd_travel_fakehost"), fn)
  end)

  it("raise for a module's function or table, named by its module", function()
    local f, t = fakehost.f, fakehost.t
    local fn = function() return f() end
    refused_in_caller("handler: cannot send a function: upvalue 'f' of function at " .. where(fn)
      .. " is hd_travel_fakehost.f, of " .. host_only("hd_travel_fakehost"), fn)
    fn = function() return t end
    refused_in_caller("handler: cannot send a table: upvalue 't' of function at " .. where(fn)
      .. " is hd_travel_fakehost.t, of " .. host_only("hd_travel_fakehost"), fn)
  end)

  it("raise wherever the job reaches them: a nested function's upvalue, a table field", function()
    local f = fakehost.f
    local inner = function() return f() end
    local fn = function() return inner() end
    refused_in_caller("handler: cannot send a function: upvalue 'inner' of function at "
      .. where(fn) .. " -> upvalue 'f' of function at " .. where(inner)
      .. " is hd_travel_fakehost.f, of " .. host_only("hd_travel_fakehost"), fn)
    local cfg = { name = "x", deps = { mod = fakehost } }
    fn = function() return cfg.name end
    refused_in_caller("handler: cannot send a table: upvalue 'cfg' of function at " .. where(fn)
      .. " -> .deps.mod is " .. host_only("hd_travel_fakehost"), fn)
    refused_in_caller("handler: cannot send a function: value #1 is hd_travel_fakehost.f, of "
      .. host_only("hd_travel_fakehost"), fakehost.f)
  end)

  it("raise for a module a preload function of the host made", function()
    package.preload.hd_travel_preloaded = function() return { v = 7 } end
    finally(function()
      package.preload.hd_travel_preloaded = nil
      package.loaded.hd_travel_preloaded = nil
    end)
    local pre = require("hd_travel_preloaded")
    local fn = function() return pre.v end
    refused_in_caller("handler: cannot send a table: upvalue 'pre' of function at " .. where(fn)
      .. " is " .. host_only("hd_travel_preloaded"), fn)
  end)

  it("raise for a submodule no path finds", function()
    local sub = { 1 }
    package.loaded["hd_travel.sub.mod"] = sub
    finally(function() package.loaded["hd_travel.sub.mod"] = nil end)
    local fn = function() return sub end
    refused_in_caller("handler: cannot send a table: upvalue 'sub' of function at " .. where(fn)
      .. " is " .. host_only("hd_travel.sub.mod"), fn)
  end)

  it("raise from pool:async too, and from a sandboxed pool, starting no job", function()
    local pool = handler.pool({ max_workers = 1, sandbox = true })
    finally(function() pool:close() end)
    local fn = function() return fakehost end
    local msg = "handler: cannot send a table: upvalue 'fakehost' of function at " .. where(fn)
      .. " is " .. host_only("hd_travel_fakehost")
    assert.equals(msg, raised(pool.async, pool, fn))
    assert.equals(msg, raised(pool.run, pool, fn))
    assert.equals(0, pool:stats().started)
    local ok, v = pool:run(function() return 3 end)
    assert.is_true(ok, tostring(v))
    assert.equals(3, v)
  end)

  it("leave the module usable in the host", function()
    local fn = function() return fakehost end
    raised(run, fn)
    assert.equals(1, fakehost.f())
    assert.equals(fakehost, package.loaded.hd_travel_fakehost)
  end)
end)

describe("modules a worker can load", function()
  H.leak_checked()
  local dir, saved_path

  before_each(function()
    dir = H.tmpdir()
    saved_path = package.path
  end)

  after_each(function()
    package.path = saved_path
    for _, name in ipairs({ "hd_travel_onpath", "hd_travel_pkg", "hd_travel_pkg.sub",
                            "hd_travel_later" }) do
      package.loaded[name] = nil
    end
    H.rm_r(dir)
  end)

  it("travel by name when on package.path: the worker requires its own", function()
    H.write_file(dir .. "/hd_travel_onpath.lua",
      "return { answer = function() return 42 end, data = { 1, 2 } }\n")
    package.path = dir .. "/?.lua;" .. package.path
    local m = require("hd_travel_onpath")
    local answer = m.answer
    local ok, a, same, field, two = run(function()
      return answer(), m == require("hd_travel_onpath"),
        answer == require("hd_travel_onpath").answer, m.data[2]
    end)
    assert.is_true(ok, tostring(a))
    assert.equals(42, a)
    assert.is_true(same)
    assert.is_true(field)
    assert.equals(2, two)
  end)

  it("travel by name as submodules and as a directory's init.lua", function()
    os.execute("mkdir -p " .. H.shell_quote(dir .. "/hd_travel_pkg"))
    H.write_file(dir .. "/hd_travel_pkg/init.lua", "return { top = true }\n")
    H.write_file(dir .. "/hd_travel_pkg/sub.lua", "return { sub = true }\n")
    package.path = dir .. "/?.lua;" .. dir .. "/?/init.lua;" .. package.path
    local top, sub = require("hd_travel_pkg"), require("hd_travel_pkg.sub")
    local ok, a, b = run(function()
      return top == require("hd_travel_pkg") and top.top, sub == require("hd_travel_pkg.sub")
    end)
    assert.is_true(ok, tostring(a))
    assert.is_true(a)
    assert.is_true(b)
  end)

  it("follow package.path as it changes", function()
    H.write_file(dir .. "/hd_travel_later.lua", "return { from_file = true }\n")
    -- Loaded by the host before its directory is on the path: only here.
    local later = dofile(dir .. "/hd_travel_later.lua")
    package.loaded.hd_travel_later = later
    local fn = function() return later.from_file end
    local msg = "handler: cannot send a table: upvalue 'later' of function at " .. where(fn)
      .. " is " .. host_only("hd_travel_later")
    assert.equals(msg, raised(run, fn))
    package.path = dir .. "/?.lua;" .. package.path
    local ok, v = run(fn)
    assert.is_true(ok, tostring(v))
    assert.is_true(v)
    package.path = saved_path
    assert.equals(msg, raised(run, fn))
  end)

  it("include the standard libraries, loaded and preloaded", function()
    local fmt, band, concat, jutil, floor = string.format, require("bit").band, table.concat,
      require("jit.util"), math.floor
    local ok, a, b, c, d, e = run(function()
      return fmt("%03d", 7), band(6, 3), concat({ "a", "b" }), type(jutil.funcinfo), floor(2.5)
    end)
    assert.is_true(ok, tostring(a))
    assert.equals("007", a)
    assert.equals(2, b)
    assert.equals("ab", c)
    assert.equals("function", d)
    assert.equals(2, e)
  end)

  it("include C modules on package.cpath", function()
    local has, cjson = pcall(require, "cjson")
    if not has then return pending("lua-cjson is not installed") end
    local ok, v = run(function() return cjson.encode({ 1, 2 }) end)
    assert.is_true(ok, tostring(v))
    assert.equals("[1,2]", v)
  end)
end)

describe("values a host layer refused (handler._refuse)", function()
  H.leak_checked()
  local WHAT = "ngx.ctx, the request's own table (a job would get a copy)"

  it("raise in the caller, naming the upvalue and what the value is", function()
    local ctx = { user = "x" }
    handler._refuse(ctx, WHAT)
    local fn = function() return ctx.user end
    refused_in_caller("handler: cannot send a table: upvalue 'ctx' of function at " .. where(fn)
      .. " is " .. WHAT, fn)
  end)

  it("raise wherever the job reaches them: a field, a key, a nested function's upvalue", function()
    local ctx = {}
    handler._refuse(ctx, WHAT)
    local state = { req = { ctx = ctx } }
    local fn = function() return state end
    refused_in_caller("handler: cannot send a table: upvalue 'state' of function at " .. where(fn)
      .. " -> .req.ctx is " .. WHAT, fn)
    local keyed = { [ctx] = true }
    fn = function() return keyed end
    refused_in_caller("handler: cannot send a table: upvalue 'keyed' of function at " .. where(fn)
      .. " -> [table key](key) is " .. WHAT, fn)
    local inner = function() return ctx end
    fn = function() return inner() end
    refused_in_caller("handler: cannot send a table: upvalue 'inner' of function at " .. where(fn)
      .. " -> upvalue 'ctx' of function at " .. where(inner) .. " is " .. WHAT, fn)
  end)

  it("may be functions and userdata, named or not", function()
    local lua_fn = function() return 1 end
    local proxy = newproxy()
    handler._refuse(lua_fn, "a callback of this request")
    handler._refuse(proxy, "a handle of this request")
    handler._refuse(string.rep, "string.rep, refused for the test")
    finally(function() handler._refuse(string.rep, nil) end)
    local fn = function() return lua_fn() end
    refused_in_caller("handler: cannot send a function: upvalue 'lua_fn' of function at "
      .. where(fn) .. " is a callback of this request", fn)
    fn = function() return proxy end
    refused_in_caller("handler: cannot send a userdata: upvalue 'proxy' of function at "
      .. where(fn) .. " is a handle of this request", fn)
    local rep = string.rep
    fn = function() return rep("x", 2) end
    refused_in_caller("handler: cannot send a function: upvalue 'rep' of function at "
      .. where(fn) .. " is string.rep, refused for the test", fn)
  end)

  it("travel again once the mark is lifted; an equal copy always does", function()
    local ctx = { n = 1 }
    handler._refuse(ctx, WHAT)
    local copy = { n = 1 }
    local ok, v = run(function() return copy.n end)
    assert.is_true(ok, tostring(v))
    assert.equals(1, v)
    local fn = function() return ctx.n end
    raised(run, fn)
    handler._refuse(ctx, nil)
    ok, v = run(fn)
    assert.is_true(ok, tostring(v))
    assert.equals(1, v)
  end)

  it("are not kept alive by the mark", function()
    local weak = setmetatable({}, { __mode = "k" })
    do
      local t = {}
      handler._refuse(t, WHAT)
      weak[t] = true
    end
    collectgarbage()
    collectgarbage()
    assert.is_nil(next(weak))
  end)

  it("must be tables, functions or userdata, and the reason a string", function()
    assert.matches("table, function or userdata expected", raised(handler._refuse, 1, WHAT))
    assert.matches("table, function or userdata expected", raised(handler._refuse, "s", WHAT))
    assert.matches("string expected", raised(handler._refuse, {}, 5))
  end)
end)
