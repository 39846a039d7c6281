-- spec/package_spec.lua: what a LuaRocks user gets. Everything starts from a
-- clean `git clone` of the checkout's committed HEAD (the repository at
-- $HANDLER_TEST_SRC, else the current directory), never from the work tree:
--   * `luarocks pack` turns handler-scm-1.rockspec into a source rock. The
--     rockspec's git URL is the project's public one and this machine has no
--     network, so git is told (through a gitconfig in a private HOME) to
--     fetch that URL from the clone instead; the rockspec is used unchanged.
--   * `luarocks install` of that source rock builds and installs into a
--     temporary tree, and so does `luarocks make` run inside the clone.
--   * a luajit started in another directory, with only that tree on its
--     paths, runs a job: `true 42`; and no process is left behind.
--   * a build for a PUC Lua interpreter is refused, saying why.
-- Every command runs under `timeout`; the file takes about 7 s on an idle
-- 2-core machine (two builds of a few seconds each).
-- HANDLER_SKIP_PACKAGE=1 skips it, and so does the sanitizer run of the
-- suite. Temporary directories are always removed.
local ffi = require("ffi")
local H = require("spec.support.helpers")

local q = H.shell_quote
local format = string.format

pcall(ffi.cdef, [[long hd_pkg_readlink(const char *path, char *buf, size_t n) __asm__("readlink");]])

-- The limit on one command (a build is a few seconds on an idle machine).
local COMMAND_SECONDS = 120

local function sh_ok(cmd)
  local p = io.popen(cmd .. " >/dev/null 2>&1; echo $?")
  local rc = p:read("*l")
  p:close()
  return rc == "0"
end

--- Runs a shell command with its output in a log; returns whether it exited
-- 0, and the log.
local function run(dir, name, cmd)
  local log, rcfile = dir .. "/" .. name .. ".log", dir .. "/" .. name .. ".rc"
  os.execute(format("(%s) > %s 2>&1 < /dev/null; echo $? > %s", cmd, q(log), q(rcfile)))
  return (H.read_file(rcfile) or ""):match("^0%s*$") ~= nil, H.read_file(log) or ""
end

local function tail(text, n)
  local lines = {}
  for line in text:gmatch("[^\n]*") do lines[#lines + 1] = line end
  local from = math.max(1, #lines - (n or 40))
  return table.concat(lines, "\n", from)
end

--- The pids of processes whose executable lies under dir.
local function procs_under(dir)
  local out, buf = {}, ffi.new("char[4096]")
  for _, pid in ipairs(H.all_pids()) do
    local n = ffi.C.hd_pkg_readlink("/proc/" .. pid .. "/exe", buf, 4095)
    if n > 0 and ffi.string(buf, n):sub(1, #dir + 1) == dir .. "/" then out[#out + 1] = pid end
  end
  return out
end

local function cwd()
  local p = io.popen("pwd")
  local d = p:read("*l")
  p:close()
  return d
end

local function skip_reason(src)
  if os.getenv("HANDLER_SKIP_PACKAGE") == "1" then return "HANDLER_SKIP_PACKAGE=1" end
  -- The package builds its own binaries, not the build under test: one run,
  -- on the normal build, says all there is to say.
  if (os.getenv("LD_PRELOAD") or ""):find("asan", 1, true)
    or (os.getenv("HANDLER_TEST_BUILD") or ""):find("asan", 1, true) then
    return "runs on the normal build only (the package builds its own binaries)"
  end
  for _, tool in ipairs({ "git", "luarocks", "cmake", "timeout", "readelf", "zip", "unzip" }) do
    if not sh_ok("command -v " .. tool) then return "no " .. tool .. " on PATH" end
  end
  if not sh_ok("git -C " .. q(src) .. " rev-parse --verify -q HEAD") then
    return src .. " is not a git checkout with a commit"
  end
  return nil
end

describe("the LuaRocks package", function()
  local src = os.getenv("HANDLER_TEST_SRC") or cwd()
  local skip = skip_reason(src)
  -- Skipped tests show as pending, with the reason.
  local test = skip and function(name) pending(name .. ": skipped, " .. skip) end or it
  local tmp, env, rockspec_url

  lazy_setup(function()
    if skip then return end
    tmp = H.tmpdir()
    -- A private HOME: no user luarocks config or cache, and a gitconfig that
    -- sends the rockspec's URL to the clone. LUAROCKS_CONFIG picks LuaJIT
    -- even where a PUC lua5.1 would be found first.
    local home = tmp .. "/home"
    os.execute("mkdir -p " .. q(home))
    H.write_file(tmp .. "/luarocks-config.lua", 'lua_interpreter = "luajit"\n')
    env = table.concat({
      "env -u LUA_PATH -u LUA_CPATH -u LUA_INIT -u HANDLER_WORKER -u XDG_CONFIG_HOME",
      "-u LD_PRELOAD -u ASAN_OPTIONS -u UBSAN_OPTIONS",
      "-u GIT_CONFIG_GLOBAL -u GIT_DIR -u GIT_WORK_TREE",
      "HOME=" .. q(home), "LUAROCKS_CONFIG=" .. q(tmp .. "/luarocks-config.lua"),
      "GIT_CONFIG_NOSYSTEM=1",
    }, " ")
    local ok, log = run(tmp, "clone", "git clone -q " .. q(src) .. " " .. q(tmp .. "/clone"))
    assert(ok, "git clone of " .. src .. " failed:\n" .. log)
    local spec = {}
    local chunk = assert(loadfile(tmp .. "/clone/handler-scm-1.rockspec"))
    setfenv(chunk, spec)()
    rockspec_url = spec.source.url
    local fetch_url = assert(rockspec_url:match("^git%+(https://.+)$"),
      "the rockspec's source.url is not a git+https URL: " .. tostring(rockspec_url))
    H.write_file(home .. "/.gitconfig", format('[url "file://%s/clone"]\n\tinsteadOf = %s\n',
      tmp, fetch_url))
  end)

  lazy_teardown(function()
    if tmp == nil then return end
    -- Whatever is still running from the trees is ours: end it by pid.
    for _, pid in ipairs(procs_under(tmp)) do H.kill9(pid) end
    H.rm_r(tmp)
  end)

  local function luarocks(name, dir, args)
    return run(tmp, name, format("cd %s && %s timeout -s KILL %d luarocks --lua-version=5.1 %s",
      q(dir), env, COMMAND_SECONDS, args))
  end

  --- Runs a job through the handler installed in tree, from another
  -- directory, with only the tree on the module paths.
  local function check_tree(tree)
    local lua_dir, lib_dir = tree .. "/share/lua/5.1", tree .. "/lib/lua/5.1"
    assert.is_true(H.exists(lua_dir .. "/handler/init.lua"))
    assert.is_true(H.exists(lua_dir .. "/handler/errors.lua"))
    assert.is_true(H.exists(lib_dir .. "/handler/core.so"))
    assert.is_true(sh_ok("test -x " .. q(lib_dir .. "/handler/handler-worker")))
    -- The module takes the VM from its host; the worker brings its own.
    local _, core_needs = run(tmp, "readelf-core", "readelf -d " .. q(lib_dir .. "/handler/core.so"))
    local _, worker_needs = run(tmp, "readelf-worker",
      "readelf -d " .. q(lib_dir .. "/handler/handler-worker"))
    assert.is_nil(core_needs:match("NEEDED[^\n]*luajit"), core_needs)
    assert.is_truthy(worker_needs:match("NEEDED[^\n]*libluajit"), worker_needs)

    local elsewhere = tmp .. "/elsewhere"
    os.execute("mkdir -p " .. q(elsewhere))
    local paths = format("LUA_PATH=%s LUA_CPATH=%s",
      q(lua_dir .. "/?.lua;" .. lua_dir .. "/?/init.lua"), q(lib_dir .. "/?.so"))
    local script = 'local h = require("handler") '
      .. 'print(h.run(function() return 6 * 7 end)) '
      .. 'print(package.searchpath("handler.core", package.cpath))'
    local ok, out = run(tmp, "use", format("cd %s && %s %s timeout -s KILL 60 luajit -e %s",
      q(elsewhere), env, paths, q(script)))
    assert(ok, "luajit with the installed tree failed:\n" .. out)
    assert.are.equal("true\t42\n" .. lib_dir .. "/handler/core.so\n", out)
    -- The command line is installed with it, and runs a record.
    assert.is_true(sh_ok("test -x " .. q(tree .. "/bin/handler")))
    H.write_file(elsewhere .. "/double.lua", "return function(r) return r.n * 2 end")
    -- (lua-cjson, which the command needs, from the system's paths.)
    local with_cjson = format("LUA_PATH=%s LUA_CPATH=%s",
      q(lua_dir .. "/?.lua;" .. lua_dir .. "/?/init.lua;;"), q(lib_dir .. "/?.so;;"))
    ok, out = run(tmp, "command", format("cd %s && echo '{\"n\":21}' | %s %s timeout -s KILL 60 %s map double.lua",
      q(elsewhere), env, with_cjson, q(tree .. "/bin/handler")))
    assert(ok, "the installed handler command failed:\n" .. out)
    assert.matches("^42\n", out)
    -- The supervisor and its workers end with their host.
    local left
    local gone = H.wait_until(function()
      left = procs_under(tmp)
      return #left == 0
    end, 5)
    assert(gone, "processes left running from the tree: " .. table.concat(left or {}, ","))
  end

  test("packs the rockspec into a source rock that installs and runs", function()
    local t0 = H.now()
    local pack_dir, tree = tmp .. "/pack", tmp .. "/tree-src-rock"
    os.execute("mkdir -p " .. q(pack_dir))
    assert(run(tmp, "cp", format("cp %s %s", q(tmp .. "/clone/handler-scm-1.rockspec"),
      q(pack_dir))))
    local ok, log = luarocks("pack", pack_dir, "pack handler-scm-1.rockspec")
    assert(ok, "luarocks pack failed (source " .. rockspec_url .. "):\n" .. tail(log))
    local rock = pack_dir .. "/handler-scm-1.src.rock"
    assert.is_true(H.exists(rock), log)
    -- The source rock carries the rockspec and the committed sources.
    local _, listing = run(tmp, "unzip", "unzip -l " .. q(rock))
    for _, file in ipairs({ "handler-scm-1.rockspec", "handler/CMakeLists.txt",
      "handler/LICENSE", "handler/lua/handler/init.lua" }) do
      assert.is_truthy(listing:find(file, 1, true), "the source rock lacks " .. file)
    end

    -- Installed from somewhere else, as a user would.
    os.execute("mkdir -p " .. q(tmp .. "/elsewhere"))
    ok, log = luarocks("install", tmp .. "/elsewhere",
      format("install %s --tree %s", q(rock), q(tree)))
    assert(ok, "luarocks install of the source rock failed:\n" .. tail(log))
    check_tree(tree)
    print(format("\n[package] pack + install from the source rock + a job: %.1f s",
      H.now() - t0))
  end)

  test("builds and installs with `luarocks make` from a clean clone", function()
    local t0 = H.now()
    local tree = tmp .. "/tree-make"
    local ok, log = luarocks("make", tmp .. "/clone", "make --tree " .. q(tree))
    assert(ok, "luarocks make failed:\n" .. tail(log))
    -- A user's build: no -Werror, luarocks' CFLAGS.
    local cache = H.read_file(tmp .. "/clone/build.luarocks/CMakeCache.txt") or ""
    assert.is_truthy(cache:find("HANDLER_WERROR:BOOL=OFF", 1, true))
    check_tree(tree)
    print(format("\n[package] luarocks make + a job: %.1f s", H.now() - t0))
  end)

  test("refuses to build for PUC Lua, saying why", function()
    local puc
    for _, name in ipairs({ "lua5.1", "lua5.2", "lua5.3", "lua5.4", "lua" }) do
      local p = io.popen("command -v " .. name .. " 2>/dev/null")
      local path = p:read("*l")
      p:close()
      if path and sh_ok(q(path) .. " -e 'assert(not jit)'") then
        puc = path
        break
      end
    end
    if puc == nil then return pending("no PUC Lua interpreter on PATH") end
    local clone = tmp .. "/clone-puc"
    assert(run(tmp, "clone-puc", "git clone -q " .. q(tmp .. "/clone") .. " " .. q(clone)))
    local tree = tmp .. "/tree-puc"
    local ok, log = luarocks("make-puc", clone, format("make --tree %s LUA=%s", q(tree), q(puc)))
    assert.is_false(ok, log)
    assert.is_truthy(log:find("handler runs only in LuaJIT 2.1", 1, true), tail(log))
    assert.is_truthy(log:find("PUC Lua is not supported", 1, true), tail(log))
    assert.is_false(H.exists(tree .. "/lib/lua/5.1/handler/core.so"))
  end)
end)
