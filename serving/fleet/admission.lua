-- Admission at discovery: SuperSONIC's rule (helm/supersonic/cfg/envoy-filter.lua, release 0.3.1).
--
-- A new SONIC job asks every server for its model repository index (TritonService at job start)
-- and skips a server whose index fails or lists nothing. So when the fleet is loaded (the average
-- queue time per execution, read from Prometheus, is above the threshold), this filter empties the
-- RepositoryIndex answer and marks it grpc-status 1: new jobs go elsewhere, while running jobs
-- (ModelInfer, ModelConfig, ...) pass untouched and are never cut off.
--
-- Differences from SuperSONIC's script, on purpose:
--   * the value is matched whatever the timestamp or number format ("1733370000" without a
--     fraction, "1.5e-05"); SuperSONIC's pattern misses both and then refuses;
--   * no value (Prometheus unreachable, or fewer than two scrapes in the window) refuses
--     explicitly and says so in the log; SuperSONIC refuses too, by failing on a nil value;
--   * the query is URL-encoded once, when the configuration is rendered.
-- The placeholders (upper-case names between at signs) are filled in by serving/fleet/envoy_config.py.

local INDEX_PATH = "/inference.GRPCInferenceService/RepositoryIndex"
local QUERY_PATH = "@QUERY_PATH@"
local PROMETHEUS_AUTHORITY = "@PROMETHEUS_AUTHORITY@"
local PROMETHEUS_CLUSTER = "@PROMETHEUS_CLUSTER@"
local THRESHOLD_MS = @THRESHOLD_MS@
local PROMETHEUS_TIMEOUT_MS = 5000

-- The server load in ms, or nil and the reason there is none.
local function server_load(handle)
  local headers, body = handle:httpCall(
    PROMETHEUS_CLUSTER,
    {[":method"] = "GET", [":path"] = QUERY_PATH, [":authority"] = PROMETHEUS_AUTHORITY},
    "",
    PROMETHEUS_TIMEOUT_MS
  )
  if not headers or headers[":status"] ~= "200" then
    return nil, "Prometheus did not answer"
  end
  local text = body and string.match(body, '"value":%[[^,%]]+,"([^"]+)"%]')
  local value = text and tonumber(text)
  if value == nil then
    return nil, "no value for the metric yet"
  end
  return value, nil
end

function envoy_on_request(handle)
  if handle:headers():get(":path") ~= INDEX_PATH then
    return
  end
  local ok, value, why = pcall(server_load, handle)
  local admit = ok and value ~= nil and value <= THRESHOLD_MS
  if not admit then
    local reason = (not ok and tostring(value)) or why or (string.format("%.6g", value) .. " ms > threshold")
    handle:logInfo("admission: refusing a new client (" .. reason .. ")")
  end
  handle:streamInfo():dynamicMetadata():set("top_tagger.admission", "refused", not admit)
end

function envoy_on_response(handle)
  local admission = handle:streamInfo():dynamicMetadata():get("top_tagger.admission")
  if admission and admission["refused"] then
    -- As SuperSONIC: the answer keeps its HTTP/2 shape but lists no model.
    handle:body():setBytes("")
    handle:headers():replace("grpc-status", "1")
    handle:headers():replace("grpc-message", "server load above the admission threshold")
  end
end
