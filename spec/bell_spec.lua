-- bell_spec.lua: the bell, for hosts that can wait only on sockets they
-- connect themselves (nginx): a byte arrives on a connection once it is
-- armed and the loop has work; its socket lives in a private directory that
-- goes with the process.
local ffi = require("ffi")
local handler = require("handler")
local core = require("handler.core")
local H = require("spec.support.helpers")

pcall(ffi.cdef, [[
int hd_bell_socket(int domain, int type, int proto) __asm__("socket");
int hd_bell_connect(int fd, const void *addr, unsigned len) __asm__("connect");
long hd_bell_write(int fd, const void *buf, unsigned long n) __asm__("write");
long hd_bell_read(int fd, void *buf, unsigned long n) __asm__("read");
int hd_bell_close(int fd) __asm__("close");
typedef struct { unsigned short family; char path[108]; } hd_bell_sockaddr_un;
]])
local C = ffi.C
local AF_UNIX, SOCK_STREAM = 1, 1

local function connect(path)
  local fd = C.hd_bell_socket(AF_UNIX, SOCK_STREAM, 0)
  assert(fd >= 0)
  local sa = ffi.new("hd_bell_sockaddr_un")
  sa.family = AF_UNIX
  ffi.copy(sa.path, path)
  assert(C.hd_bell_connect(fd, sa, ffi.sizeof(sa)) == 0, "connect " .. path)
  return fd
end

local function arm(fd)
  assert(C.hd_bell_write(fd, "a", 1) == 1)
end

local function read_byte(fd)
  local b = ffi.new("char[1]")
  return C.hd_bell_read(fd, b, 1) == 1 and ffi.string(b, 1) or nil
end

describe("the bell", function()
  -- The specs after this one count the process's sockets.
  teardown(function() core.bell_close() end)

  it("is a socket in a private directory under TMPDIR", function()
    local path = core.bell()
    assert.are.equal(path, core.bell())
    local dir = path:match("^(.*)/s$")
    assert.matches("/handler%-bell%-" .. H.getpid() .. "%-", dir)
    local p = io.popen("stat -c '%a %u %F' " .. H.shell_quote(dir) .. " " .. H.shell_quote(path))
    local out = p:read("*a")
    p:close()
    assert.matches("^700 %d+ directory\n%d+ %d+ socket\n$", out)
  end)

  it("rings once per arming when the loop has work, and only then", function()
    local fd = connect(core.bell())
    local pool = handler.pool{ max_workers = 1 }
    -- Connected, not armed: a job's start and reply ring nothing.
    local job = assert(pool:async(function() return 1 end))
    assert.is_false(H.readable(fd, 300))
    -- Armed: the work waiting in the loop rings at once, one byte.
    arm(fd)
    assert.is_true(H.readable(fd, 2000))
    assert.are.equal("w", read_byte(fd))
    assert.is_true(H.wait_until(function() handler.step() return job:done() end))
    assert.are.same({ true, 1 }, { job:await() })
    -- Drained and armed: quiet until the next reply.
    assert.is_true(H.wait_until(function()
      handler.step()
      return not H.readable(handler.fd(), 0)
    end))
    arm(fd)
    assert.is_false(H.readable(fd, 200))
    local job2 = assert(pool:async(function() return 2 end))
    assert.is_true(H.readable(fd, 2000))
    assert.are.equal("w", read_byte(fd))
    -- Rung once: not again until armed again.
    assert.is_false(H.readable(fd, 100))
    assert.is_true(H.wait_until(function() handler.step() return job2:done() end))
    assert.are.same({ true, 2 }, { job2:await() })
    C.hd_bell_close(fd)
    pool:close()
  end)

  it("cannot be reached by another user", function()
    local id = io.popen("id -u")
    local root = id:read("*l") == "0"
    id:close()
    if not root then
      pending("needs root: the attacker runs as nobody")
      return
    end
    local path = core.bell()
    local out = H.run_host_as_nobody(([[
      local ffi = require("ffi")
      ffi.cdef("int socket(int, int, int); int connect(int, const void *, unsigned);"
        .. "typedef struct { unsigned short family; char path[108]; } sun_t; char *strerror(int);")
      local fd = ffi.C.socket(1, 1, 0)
      local sa = ffi.new("sun_t")
      sa.family = 1
      ffi.copy(sa.path, %q)
      local r = ffi.C.connect(fd, sa, ffi.sizeof(sa))
      io.write(r == 0 and "connected" or ffi.string(ffi.C.strerror(ffi.errno())))
    ]]):format(path))
    assert.are.equal("Permission denied", out)
  end)

  it("rings for a deadline", function()
    local fd = connect(core.bell())
    local pool = handler.pool{ max_workers = 1 }
    local job = assert(pool:async(function() while true do end end, { max_ms = 150 }))
    local t0 = H.now()
    while true do
      handler.step()
      if job:done() then break end
      arm(fd)
      assert.is_true(H.readable(fd, 3000), "the bell stayed quiet")
      read_byte(fd)
      assert.is_true(H.now() - t0 < 2, "no end in sight")
    end
    assert.is_true(H.now() - t0 < 0.15 + 0.6, "took " .. (H.now() - t0))
    local ok, err = job:await()
    assert.is_false(ok)
    assert.are.equal("Timeout", err.type)
    C.hd_bell_close(fd)
    pool:close()
  end)

  it("goes with its process; a dead process's directory goes with the next bell", function()
    local dir = H.tmpdir()
    local script = ([[
      package.path = %q
      package.cpath = %q
      local core = require("handler.core")
      io.write(core.bell(), "\n")
      io.flush()
      %s
    ]])
    -- TMPDIR is the private one, for both hosts.
    local env = "TMPDIR=" .. dir
    local function run(tail)
      local path = dir .. "/host.lua"
      H.write_file(path, script:format(package.path, package.cpath, tail))
      local p = io.popen(env .. " timeout -s KILL 30 luajit " .. H.shell_quote(path) .. " 2>&1")
      local out = p:read("*a")
      p:close()
      return out
    end
    -- A clean exit removes the socket and its directory.
    local first = run("")
    assert.matches("^" .. dir .. "/handler%-bell%-%d+%-", first)
    assert.is_false(H.exists((first:match("^(.-)/s\n"))))
    -- SIGKILL leaves them behind ...
    local killed = run('os.execute("kill -9 " .. io.open("/proc/self/stat"):read("*a"):match("^(%d+)"))')
    local killed_dir = killed:match("^(.-)/s\n")
    assert.is_not_nil(killed_dir, killed)
    assert.is_true(H.exists(killed_dir))
    -- ... until the next bell under the same TMPDIR sweeps them.
    run("")
    assert.is_false(H.exists(killed_dir))
    H.rm_r(dir)
  end)
end)
