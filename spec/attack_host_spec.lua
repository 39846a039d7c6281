-- attack_host_spec.lua: what the host guarantees against a hostile worker
-- and around its own life: replies cost memory in proportion to their size,
-- results are plain data, a forked host starts afresh, and a host that
-- calls handler while its Lua state closes fails cleanly. SECURITY.md names
-- these cases.
--
-- Anything that could kill or wedge the host runs in a disposable host
-- process (host() below, like H.run_host, but with the exit status).
local handler = require("handler")
local H = require("spec.support.helpers")

local core = handler._core
local encode, decode = core.encode, core.decode
local char, rep, floor, concat, format = string.char, string.rep, math.floor, table.concat,
  string.format
local tostring, tonumber, type, pcall, ipairs, select, getmetatable, setmetatable =
  tostring, tonumber, type, pcall, ipairs, select, getmetatable, setmetatable

---------------------------------------------------------------------------
-- Disposable hosts.

-- Runs `script` (Lua source) in a new luajit process with this build of
-- handler on its paths; returns everything it printed and its exit status
-- (as the shell reports it: 128 + n for a death by signal n). Killed after
-- 60 s.
local function host(script)
  local dir = H.tmpdir()
  local path, out = dir .. "/host.lua", dir .. "/out"
  H.write_file(path, script)
  os.execute(H.lua_env() .. " timeout -s KILL 60 luajit " .. H.shell_quote(path) .. " > "
    .. H.shell_quote(out) .. " 2>&1; echo \"exit status $?\" >> " .. H.shell_quote(out))
  local text = H.read_file(out) or ""
  H.rm_r(dir)
  return text, tonumber(text:match("exit status (%d+)\n$"))
end

---------------------------------------------------------------------------
-- A handler call while the Lua state closes.

describe("a host whose Lua state closes", function()
  -- The finalizers of lua_close run after the package library has
  -- dlclosed core.so (its handle is older than anything the module made).
  local cases = {
    { "calls handler.run from a finalizer made before the module: a clean error",
      before = true, ending = "",
      expect = { "gc\tfalse\t", "handler: the module has been shut down" } },
    { "calls handler.run from a finalizer at os.exit(0, true): a clean error",
      before = true, ending = "os.exit(0, true)",
      expect = { "gc\tfalse\t", "handler: the module has been shut down" } },
    { "calls handler.run from a finalizer made after the module: no crash",
      before = false, ending = "", expect = { "gc\t" } },
    { "calls handler.run from a finalizer made after the module, at os.exit(0, true): no crash",
      before = false, ending = "os.exit(0, true)", expect = { "gc\t" } },
  }
  for _, c in ipairs(cases) do
    it(c[1], function()
      local make = [[
        local p = newproxy(true)
        getmetatable(p).__gc = function()
          print("gc", pcall(handler.run, function() return 2 end))
          io.stdout:flush()
        end
        _G.keep = p
      ]]
      local script = "local handler\n" .. (c.before and make or "") ..
        "handler = require('handler')\n" ..
        "print('first', handler.run(function() return 1 end))\n" ..
        (c.before and "" or make) ..
        "local job = handler.default_pool():async(function() return 3 end)\n" ..
        "print('job', job:await())\n" ..
        "io.stdout:flush()\n" .. c.ending .. "\n"
      local out, status = host(script)
      assert.are.equal(0, status, out)
      H.assert_has_all(out, { "first\ttrue\t1", "job\ttrue\t3" })
      H.assert_has_all(out, c.expect)
      -- When the call ran at all, it ran whole: a result, or the clean error.
      local gc_line = out:match("gc\t[^\n]*")
      assert.is_truthy(gc_line, out)
      assert.is_truthy(gc_line:find("gc\ttrue\ttrue\t2", 1, true) or
        gc_line:find("handler: the module has been shut down", 1, true), gc_line)
    end)
  end

  it("keeps core.so mapped when the package library closes it", function()
    -- Linked with -z nodelete: dlclose leaves the code of the module in
    -- place for the finalizers that still reach it.
    local f = io.popen("readelf -d " .. H.shell_quote(core.worker_path:gsub("handler%-worker$",
      "core.so")) .. " 2>/dev/null")
    local text = f:read("*a")
    f:close()
    if text == "" then
      pending("readelf is not installed")
      return
    end
    assert.matches("NODELETE", text, 1, true)
  end)
end)
