-- handler.cli: the command line, `handler map SCRIPT.lua [INPUT...] [options]`:
-- JSON Lines in, each record a job of its own (pool:map), JSON Lines out.

local ffi = require("ffi")
local handler = require("handler")
local map_mod = require("handler.map")

local format, concat, tonumber, tostring, type, pairs, ipairs, pcall, floor =
  string.format, table.concat, tonumber, tostring, type, pairs, ipairs, pcall, math.floor
local open, huge, byte, find, sub = io.open, math.huge, string.byte, string.find, string.sub

local M = {}

local USAGE = [[
usage: handler map SCRIPT.lua [INPUT...] [options]      (no INPUT: standard input)
       handler serve [SCRIPT.lua] --redis HOST:PORT --stream NAME [options]
                                          (handler serve --help says more)

SCRIPT.lua returns a function record -> result, or { map = function, init = function }.
Each line of INPUT is a JSON value (a record); each runs as a job of its own.
Results go to standard output as JSON lines, in input order; failures as JSON lines
to --errors (default: standard error).

  -j N, --jobs N          worker processes (default: the number of CPUs)
  --max-ms MS             wall-clock limit per record
  --max-cpu-ms MS         CPU time limit per record
  --max-heap BYTES        heap limit per record (k, M, G suffixes)
  --retries N             runs again a record that timed out or crashed
  --batch N               at most N records sent to a worker at once (as many as take
                          about 4 ms together), each still run on its own, from a
                          fresh state, with its own limits (default 1024, or 1 with
                          --halt: a batch that started runs to its end)
  --sandbox               records run in the strict sandbox
  --unordered             write results as they finish
  --lines                 each line is a string, not JSON
  --errors FILE           where failures go
  --joblog FILE           one line per record: line, outcome, wall and CPU ms
  --resume                with --joblog: skip the records the log already has
  --halt N                stop after N failures (exit status 3)
  --progress, --no-progress   a progress line on standard error (default: on a terminal)

exit status: 0 every record succeeded, 1 some failed, 2 bad usage or a script that
does not load, 3 halted or interrupted (SIGINT, SIGTERM)
]]

pcall(ffi.cdef, [[
typedef struct { unsigned long sig[16]; } hd_cli_sigset;
int hd_cli_sigemptyset(hd_cli_sigset *s) __asm__("sigemptyset");
int hd_cli_sigaddset(hd_cli_sigset *s, int sig) __asm__("sigaddset");
int hd_cli_sigismember(const hd_cli_sigset *s, int sig) __asm__("sigismember");
int hd_cli_sigprocmask(int how, const hd_cli_sigset *s, hd_cli_sigset *old) __asm__("sigprocmask");
int hd_cli_sigpending(hd_cli_sigset *s) __asm__("sigpending");
int hd_cli_isatty(int fd) __asm__("isatty");
long hd_cli_sysconf(int name) __asm__("sysconf");
typedef struct { long s, ns; } hd_cli_ts;
int hd_cli_clock_gettime(int clk, hd_cli_ts *ts) __asm__("clock_gettime");
]])
local C = ffi.C
local SIGINT, SIGTERM, SIG_BLOCK, SC_NPROCESSORS_ONLN = 2, 15, 0, 84

local ts = ffi.new("hd_cli_ts")
local function now()
  C.hd_cli_clock_gettime(1, ts)
  return tonumber(ts.s) + tonumber(ts.ns) * 1e-9
end

-- A usage error: reported by main, exit status 2.
local Usage = {}

local function usage(fmt, ...)
  error(setmetatable({ message = format(fmt, ...) }, Usage), 0)
end

-- What handler serve (handler/serve.lua) shares with handler map.
M.Usage, M.usage, M.now = Usage, usage, now

local function bytes_of(s, flag)
  local n, unit = tostring(s):match("^(%d+%.?%d*)([kKmMgG]?)$")
  n = tonumber(n)
  if n == nil then usage("%s: not a number of bytes: %s", flag, tostring(s)) end
  local mult = ({ [""] = 1, k = 1024, K = 1024, m = 2^20, M = 2^20, g = 2^30, G = 2^30 })[unit]
  n = n * mult
  if n <= 0 then usage("%s: must be positive", flag) end
  return n
end

local function count_of(s, flag, min)
  local n = tonumber(s)
  if n == nil or n ~= floor(n) or n < (min or 0) then
    usage("%s: expected a whole number%s, got %s", flag, min and min > 0 and " > 0" or "",
      tostring(s))
  end
  return n
end

local function ms_of(s, flag)
  local n = tonumber(s)
  if n == nil or n <= 0 or n ~= n then usage("%s: expected a positive number of ms, got %s", flag,
    tostring(s)) end
  return n
end

M.bytes_of, M.count_of, M.ms_of = bytes_of, count_of, ms_of

--- each_arg(argv, first, fn): calls fn(arg, value) for argv[first], ...;
-- "--flag=v" comes as "--flag" with v its value; value(flag) takes the
-- option's value (the next argument) or stops with a usage error.
function M.each_arg(argv, first, fn)
  local i = first
  local function value(flag)
    local v = argv[i + 1]
    if v == nil then usage("%s needs a value", flag) end
    i = i + 1
    return v
  end
  while i <= #argv do
    local a = argv[i]
    local flag, inline = a:match("^(%-%-[%w-]+)=(.*)$")
    if flag then
      a = flag
      table.insert(argv, i + 1, inline)
    end
    fn(a, value)
    i = i + 1
  end
end

--- parse(argv) -> options; raises a Usage error.
function M.parse(argv)
  local o = { inputs = {}, retries = 0 }
  if argv[1] == "-h" or argv[1] == "--help" or argv[1] == "help" then
    o.help = true
    return o
  end
  if argv[1] ~= "map" then usage("unknown command %s (try: handler map SCRIPT.lua [INPUT...], "
    .. "handler serve [SCRIPT.lua] --redis HOST:PORT --stream NAME)",
    tostring(argv[1] or "(none)")) end
  M.each_arg(argv, 2, function(a, value)
    if a == "-j" or a == "--jobs" then o.jobs = count_of(value(a), a, 1)
    elseif a == "--max-ms" then o.max_ms = ms_of(value(a), a)
    elseif a == "--max-cpu-ms" then o.max_cpu_ms = ms_of(value(a), a)
    elseif a == "--max-heap" then o.max_heap = bytes_of(value(a), a)
    elseif a == "--retries" then o.retries = count_of(value(a), a)
    elseif a == "--batch" then o.batch = count_of(value(a), a, 1)
    elseif a == "--halt" then o.halt = count_of(value(a), a, 1)
    elseif a == "--errors" then o.errors = value(a)
    elseif a == "--joblog" then o.joblog = value(a)
    elseif a == "--sandbox" then o.sandbox = true
    elseif a == "--unordered" then o.unordered = true
    elseif a == "--lines" then o.lines = true
    elseif a == "--resume" then o.resume = true
    elseif a == "--progress" then o.progress = true
    elseif a == "--no-progress" then o.progress = false
    elseif a == "-h" or a == "--help" then o.help = true
    elseif a:sub(1, 1) == "-" and a ~= "-" then usage("unknown option %s", a)
    elseif o.script == nil then o.script = a
    else o.inputs[#o.inputs + 1] = a end
  end)
  if o.help then return o end
  if o.script == nil then usage("no SCRIPT.lua given") end
  if o.resume and o.joblog == nil then usage("--resume needs --joblog FILE") end
  if o.batch and o.batch > 1024 then usage("--batch: at most 1024 records, got %d", o.batch) end
  return o
end

-- The user's script: its map and init functions.
function M.load_script(path)
  local chunk, err = loadfile(path)
  if chunk == nil then usage("cannot load %s: %s", path, err) end
  local ok, v = pcall(chunk)
  if not ok then usage("%s raised: %s", path, tostring(v)) end
  if type(v) == "function" then return v, nil end
  if type(v) == "table" and type(v.map) == "function" and
     (v.init == nil or type(v.init) == "function") then
    return v.map, v.init
  end
  usage("%s must return a function record -> result, or { map = function, init = function }",
    path)
end

-- The lines of the joblog already written: line number -> true.
local function read_joblog(path)
  local done = {}
  local f = open(path, "r")
  if f == nil then return done end
  for l in f:lines() do
    local n = tonumber(l:match("^(%d+)\t"))
    if n then done[n] = true end
  end
  f:close()
  return done
end

-- Bytes a named input is read by at a time.
local BLOCK = 65536

-- The records, line by line, over every input: an iterator of line
-- number, text, skipping blank lines and those in `skip`. A regular file
-- is read by blocks, split here (four times faster than reading line by
-- line); standard input, a pipe or a terminal line by line, so that a
-- record a slow writer sends is read as soon as its line ends.
local function records(inputs, skip)
  local k, f, n = 0, nil, 0
  local block, pos, blocks = nil, 1, false
  local function next_file()
    if f ~= nil and f ~= io.stdin then f:close() end
    k = k + 1
    block, pos = nil, 1
    if #inputs == 0 then
      if k > 1 then return nil end
      blocks = false
      return io.stdin
    end
    if inputs[k] == nil then return nil end
    if inputs[k] == "-" then
      blocks = false
      return io.stdin
    end
    local h, err = open(inputs[k], "r")
    if h == nil then error(setmetatable({ message = "cannot read " .. inputs[k] .. ": " .. err },
      Usage), 0) end
    -- Only a regular file can seek.
    blocks = h:seek("cur") ~= nil
    return h
  end
  -- The next line of f, without its newline, or nil at its end. A line
  -- longer than a block is gathered in pieces, joined once.
  local function next_line()
    if not blocks then return f:read("*l") end
    local parts
    while true do
      if block ~= nil then
        local e = find(block, "\n", pos, true)
        if e ~= nil then
          local l = sub(block, pos, e - 1)
          pos = e + 1
          if parts == nil then return l end
          parts[#parts + 1] = l
          return concat(parts)
        end
        if pos <= #block then
          parts = parts or {}
          parts[#parts + 1] = sub(block, pos)
        end
      end
      block, pos = f:read(BLOCK), 1
      -- The last line may have no newline.
      if block == nil then return parts and concat(parts) or nil end
    end
  end
  f = next_file()
  return function()
    while f ~= nil do
      local l = next_line()
      if l == nil then
        f = next_file()
      else
        n = n + 1
        -- A JSON record starts with a bracket: most lines need no search.
        local b = byte(l, 1)
        if (b ~= nil and b > 32 or find(l, "%S")) and not skip[n] then return n, l end
      end
    end
    return nil
  end
end

local NO_STATS = {}

local function cpus()
  local n = tonumber(C.hd_cli_sysconf(SC_NPROCESSORS_ONLN))
  return n and n > 0 and n or 1
end
M.cpus = cpus

--- isatty(fd) -> whether fd is a terminal.
function M.isatty(fd)
  return C.hd_cli_isatty(fd) == 1
end

--- block_signals(list) -> pending(sig): blocks the signals of `list` (numbers)
-- in this process, so that they wait until asked for: pending(sig) says
-- whether sig has come (it stays pending).
function M.block_signals(list)
  local set = ffi.new("hd_cli_sigset")
  C.hd_cli_sigemptyset(set)
  for _, sig in ipairs(list) do C.hd_cli_sigaddset(set, sig) end
  C.hd_cli_sigprocmask(SIG_BLOCK, set, nil)
  local pending = ffi.new("hd_cli_sigset")
  return function(sig)
    C.hd_cli_sigpending(pending)
    return C.hd_cli_sigismember(pending, sig) == 1
  end, set
end

-- What a failure looks like on the errors stream.
local function failure_line(cjson, line, err)
  local reason = err.reason
  if type(reason) ~= "string" and type(reason) ~= "number" and type(reason) ~= "boolean" then
    reason = reason ~= nil and tostring(reason) or nil
  end
  local ok, s = pcall(cjson.encode, { line = line, type = err.type, message = err.message,
    reason = reason })
  if ok then return s end
  return cjson.encode({ line = line, type = err.type, message = tostring(err.message) })
end

--- main(argv [, stdout, stderr]) -> exit status
function M.main(argv, out, errs)
  out, errs = out or io.stdout, errs or io.stderr
  if argv[1] == "serve" then return require("handler.serve").main(argv, out, errs) end
  local ok, o = pcall(M.parse, argv)
  if not ok then return M.exit_status("handler map", errs, false, o) end
  if o.help then
    out:write(USAGE)
    return 0
  end
  return M.exit_status("handler map", errs, pcall(M.run, o, out, errs))
end

--- exit_status(name, errs, ok, status) -> what a command's pcall'd run
-- returned as its exit status: a usage error is said on errs (exit 2),
-- any other error raised again.
function M.exit_status(name, errs, ok, status)
  if ok then return status end
  if type(status) == "table" and getmetatable(status) == Usage then
    errs:write(name, ": ", status.message, "\n")
    return 2
  end
  error(status, 0)
end

--- run(options, out, errs) -> exit status
function M.run(o, out, errs)
  local has_cjson, cjson = pcall(require, "cjson")
  if not has_cjson then usage("needs lua-cjson (Debian: lua-cjson)") end
  local user_map, user_init = M.load_script(o.script)
  local jobs = o.jobs or cpus()
  local skip = o.resume and read_joblog(o.joblog) or {}
  local err_out = errs
  if o.errors then
    local f, e = open(o.errors, o.resume and "a" or "w")
    if f == nil then usage("cannot write --errors %s: %s", o.errors, e) end
    err_out = f
  end
  local joblog
  if o.joblog then
    local f, e = open(o.joblog, o.resume and "a" or "w")
    if f == nil then usage("cannot write --joblog %s: %s", o.joblog, e) end
    joblog = f
  end
  local lines_mode, sandbox = o.lines, o.sandbox
  local BAD = "\0handler:bad input"

  -- Outside the sandbox, each line travels to the worker as it is, and
  -- the worker decodes it (and encodes the result) with cjson, loaded by
  -- the pool's init with the user's functions: the host does little per
  -- record. In the strict sandbox (no C modules) the host does the JSON.
  local init, fn
  if sandbox then
    init = function()
      HANDLER_MAP = user_map
      if user_init then user_init() end
    end
    fn = function(rec)
      if type(rec) == "table" and rec[BAD] then return false, rec[BAD] end
      return true, HANDLER_MAP(rec)
    end
  else
    init = function()
      HANDLER_CJSON = require("cjson")
      HANDLER_MAP = user_map
      if user_init then user_init() end
    end
    fn = lines_mode and function(line)
      return true, HANDLER_CJSON.encode(HANDLER_MAP(line))
    end or function(line)
      local cj = HANDLER_CJSON
      local decoded, rec = pcall(cj.decode, line)
      if not decoded then return false, rec end
      return true, cj.encode(HANDLER_MAP(rec))
    end
  end
  local pool = handler.pool{ max_workers = jobs, init = init, sandbox = sandbox or nil,
    idle_ms = 60000 }

  -- Signals: a first SIGINT or SIGTERM starts nothing more; what is in
  -- flight ends and is written.
  local pending = M.block_signals({ SIGINT, SIGTERM })
  local function signalled()
    return pending(SIGINT) or pending(SIGTERM)
  end

  local next_record = records(o.inputs, skip)
  -- Item index -> line number: the line is the index plus an offset that
  -- changes where lines are skipped (blank, or done before a --resume);
  -- kept as the points where it changes (a table keyed by item index,
  -- cleared as results are written, would rehash over and over).
  local shift_at, shift_by, nshifts, offset = {}, {}, 0, 0
  local function line_of(i)
    local lo, hi = 1, nshifts
    while lo <= hi do
      local mid = math.floor((lo + hi) / 2)
      if shift_at[mid] <= i then lo = mid + 1 else hi = mid - 1 end
    end
    return i + (hi >= 1 and shift_by[hi] or 0)
  end
  local stopping, n_items = false, 0
  local function inputs()
    if stopping then return nil end
    local line, text = next_record()
    if line == nil then return nil end
    n_items = n_items + 1
    if line - n_items ~= offset then
      offset = line - n_items
      nshifts = nshifts + 1
      shift_at[nshifts], shift_by[nshifts] = n_items, offset
    end
    if sandbox and not lines_mode then
      local decoded, rec = pcall(cjson.decode, text)
      if not decoded then return { [BAD] = tostring(rec) } end
      -- A JSON null is a record too; the codec sends cjson.null as it is.
      return rec
    end
    return text
  end


  local opts = { max_ms = o.max_ms, max_cpu_ms = o.max_cpu_ms, max_heap_bytes = o.max_heap,
    retries = o.retries, ordered = not o.unordered, output = "inherit", batch = o.batch or (o.halt and 1 or 1024),
    -- A wide window keeps the other workers busy while a record at the
    -- head of the order waits out its limit; only twice as many jobs as
    -- workers are in the pool at once, the rest are records read ahead.
    -- Measured, -j 2, 20,000 records, 0.5 % poisoned, --max-ms 200 (the
    -- hangs alone bound it at 3.2 s): 5.6 s at 256, 3.7 s at 8,192; clean
    -- runs cost the same at either.
    window = math.min(32768, 4096 * jobs) }
  -- Stats are for the joblog only: a table per record otherwise unused.
  -- Results that are JSON strings go from the worker's reply to stdout
  -- without becoming Lua strings here (map's text mode).
  local text = not sandbox and out == io.stdout
  local TEXT, item_text = map_mod.TEXT, handler._core.item_text
  local iter, stop, stats_of = map_mod.iterator("handler map", pool, fn, inputs, opts,
    handler.wait_any, joblog ~= nil, handler._core.wait_ended, text)

  local progress = o.progress
  if progress == nil then progress = C.hd_cli_isatty(2) == 1 end
  local t0, last_shown = now(), 0
  local done, failed, by_type, halted = 0, 0, {}, false
  local last_flush, last_look = t0, t0
  local pend_log = {}
  -- Results are flushed at least every 0.2 s (below): between, they go out
  -- in big writes, not one per 4 KiB.
  if io.type(out) == "file" then out:setvbuf("full", 65536) end

  local function flush()
    out:flush()
    if joblog then
      if #pend_log > 0 then joblog:write(concat(pend_log)) end
      joblog:flush()
      pend_log = {}
    end
    err_out:flush()
  end

  local function show(final)
    local t = now()
    if not final and t - last_shown < 0.2 then return end
    last_shown = t
    local rate = done / math.max(t - t0, 1e-6)
    local kinds = {}
    for k, v in pairs(by_type) do kinds[#kinds + 1] = format("%s %d", k, v) end
    table.sort(kinds)
    errs:write(format("\r%d done, %d failed%s, %.0f/s, %.1f s%s", done, failed,
      #kinds > 0 and " (" .. concat(kinds, ", ") .. ")" or "", rate, t - t0,
      final and "\n" or "  "))
    errs:flush()
  end

  for i, job_ok, a, b, c in iter do
    local line = line_of(i)
    local st = joblog and stats_of() or NO_STATS
    local outcome
    if a == TEXT then
      item_text(b, c, true)
      outcome = "ok"
    elseif job_ok and a == true then
      if sandbox then
        local enc, s = pcall(cjson.encode, b)
        if enc then out:write(s, "\n") outcome = "ok"
        else
          a = false
          b = { type = "BadResult", message = tostring(s) }
        end
      else
        out:write(b, "\n")
        outcome = "ok"
      end
    end
    if outcome == nil then
      local err
      if job_ok then
        err = type(b) == "table" and b or { type = "BadInput", message = tostring(b) }
      else
        err = a
      end
      failed = failed + 1
      by_type[err.type] = (by_type[err.type] or 0) + 1
      err_out:write(failure_line(cjson, line, err), "\n")
      outcome = err.type
    end
    done = done + 1
    if joblog then
      pend_log[#pend_log + 1] = format("%d\t%s\t%.3f\t%s\n", line, outcome, st.wall_ms or 0,
        st.cpu_ms and format("%.3f", st.cpu_ms) or "-")
    end
    -- Written in batches, at least every 0.2 s: a stopped run's joblog
    -- never names a record whose result is not written.
    local t = now()
    if #pend_log >= 256 or t - last_flush >= 0.2 then
      flush()
      last_flush = t
    end
    if progress then show(false) end
    -- Signals are looked for every few milliseconds, not per record (a
    -- system call each).
    local look = t - last_look >= 0.005
    if look then last_look = t end
    if not stopping and ((o.halt and failed >= o.halt) or (look and signalled())) then
      stopping = true
      halted = true
      stop()
    end
  end
  flush()
  if progress then show(true) end
  errs:write(format("handler map: %d records, %d failed%s, %.2f s\n", done, failed,
    halted and ", stopped early" or "", now() - t0))
  if err_out ~= errs then err_out:close() end
  if joblog then joblog:close() end
  pool:close()
  if halted then return 3 end
  return failed > 0 and 1 or 0
end

return M
