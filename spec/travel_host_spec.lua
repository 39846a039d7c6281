-- travel_host_spec.lua: what a job's closure may take from its host, as
-- docs/API.md ("What travels") gives it: the NULL light userdata (cjson.null,
-- ngx.null) both ways.
local handler = require("handler")
local H = require("spec.support.helpers")

local run, core = handler.run, handler._core
local pcall, type, tostring, rawequal = pcall, type, tostring, rawequal

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
