-- wrk script for bench/run: builds the requests and prints a JSON summary.
--
-- Arguments after wrk's `--`:
--   fixed METHOD [BODY]            the same request every time (wrk's URL path)
--   keys corral|etcd PREFIX COUNT VALUE
--                                  a PUT to PREFIX000000 ... up to COUNT keys, in
--                                  turn, per wrk thread, or with COUNT 0 to the one
--                                  key PREFIX; through corral's /v1/kv/KEY or etcd's
--                                  JSON gateway /v3/kv/put. The value is VALUE with
--                                  its last 6 bytes replaced by the request number,
--                                  so every write changes the key (Consul skips a
--                                  write that changes nothing).
-- The summary is one line that starts with "BENCH_JSON ", which
-- bench/kvbench.py parses. Latencies are in microseconds.

local cached_request = nil
local key_format = nil
local key_prefix, key_count, key_value = nil, 0, nil
local counter = 0

local alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"

-- Encode a string as standard base64, as etcd's JSON gateway expects bytes.
local function base64(text)
    local out = {}
    for i = 1, #text, 3 do
        local a, b, c = text:byte(i, i + 2)
        local n = a * 65536 + (b or 0) * 256 + (c or 0)
        local chars = {}
        for shift = 18, 0, -6 do
            local digit = math.floor(n / 2 ^ shift) % 64
            chars[#chars + 1] = alphabet:sub(digit + 1, digit + 1)
        end
        if c == nil then chars[4] = "=" end
        if b == nil then chars[3] = "=" end
        out[#out + 1] = table.concat(chars)
    end
    return table.concat(out)
end

function init(args)
    local mode = args[1]
    if mode == "fixed" then
        wrk.method = args[2] or "GET"
        if args[3] ~= nil then
            wrk.body = args[3]
            wrk.headers["Content-Type"] = "application/json"
        end
        cached_request = wrk.format()
    elseif mode == "keys" then
        key_format = args[2]
        key_prefix = args[3]
        key_count = tonumber(args[4])
        key_value = args[5]
        if (key_format ~= "corral" and key_format ~= "etcd") or key_count == nil or key_value == nil
            or #key_value < 6 then
            error("invalid arguments for keys mode: expected corral|etcd PREFIX COUNT VALUE, VALUE of 6 bytes or more")
        end
    else
        error("invalid mode " .. tostring(mode) .. ": expected fixed or keys")
    end
end

function request()
    if cached_request ~= nil then
        return cached_request
    end
    local key = key_prefix
    if key_count > 0 then
        key = key_prefix .. string.format("%06d", counter % key_count)
    end
    local value = key_value:sub(1, #key_value - 6) .. string.format("%06d", counter % 1000000)
    counter = counter + 1
    if key_format == "corral" then
        return wrk.format("PUT", "/v1/kv/" .. key, nil, value)
    end
    local body = '{"key":"' .. base64(key) .. '","value":"' .. base64(value) .. '"}'
    return wrk.format("POST", "/v3/kv/put", {["Content-Type"] = "application/json"}, body)
end

function done(summary, latency, requests)
    local errors = summary.errors
    io.write(string.format(
        'BENCH_JSON {"requests": %d, "duration_us": %d, "bytes": %d, '
            .. '"errors_connect": %d, "errors_read": %d, "errors_write": %d, '
            .. '"errors_status": %d, "errors_timeout": %d, '
            .. '"latency_p50_us": %d, "latency_p90_us": %d, "latency_p99_us": %d, '
            .. '"latency_max_us": %d}\n',
        summary.requests, summary.duration, summary.bytes,
        errors.connect, errors.read, errors.write, errors.status, errors.timeout,
        latency:percentile(50), latency:percentile(90), latency:percentile(99),
        latency.max))
end
