/**
 * Request parameters of the test server, taken from a query string, a form body or a JSON body,
 * and checked the way `proxmox-schema` checks them.
 */
import * as Effect from "effect/Effect"
import * as Snapshot from "../../Snapshot.js"
import { ApiError, parameterError } from "./apiError.js"

/** Parameter values: strings from queries and forms, anything from JSON. */
export type Params = ReadonlyMap<string, ReadonlyArray<unknown>>

/** Parameters of a query string or form body (repeated keys make arrays). */
export const fromSearch = (
  search: URLSearchParams,
  into = new Map<string, Array<unknown>>()
): Map<string, Array<unknown>> => {
  for (const [key, value] of search) {
    const list = into.get(key)
    if (list === undefined) into.set(key, [value])
    else list.push(value)
  }
  return into
}

/** Parameters of a JSON object body. */
export const fromJson = (body: Uint8Array): Effect.Effect<Map<string, Array<unknown>>, ApiError> =>
  Effect.suspend(() => {
    let value: unknown
    try {
      value = body.length === 0 ? {} : JSON.parse(Buffer.from(body).toString("utf8"))
    } catch (cause) {
      return Effect.fail(new ApiError({ status: 400, text: `unable to parse json body - ${String(cause)}` }))
    }
    if (typeof value !== "object" || value === null || Array.isArray(value)) {
      return Effect.fail(new ApiError({ status: 400, text: "request body is not a JSON object" }))
    }
    const out = new Map<string, Array<unknown>>()
    for (const [key, v] of Object.entries(value)) out.set(key, [v])
    return Effect.succeed(out)
  })

const single = (params: Params, name: string): Effect.Effect<unknown, ApiError> => {
  const values = params.get(name)
  if (values === undefined || values.length === 0) return Effect.fail(parameterError(name, "parameter is missing."))
  if (values.length > 1) return Effect.fail(parameterError(name, "got multiple values for a single parameter"))
  return Effect.succeed(values[0])
}

const toInteger = (value: unknown): number | undefined => {
  if (typeof value === "number" && Number.isSafeInteger(value)) return value
  if (typeof value === "string" && /^-?\d+$/.test(value.trim())) {
    const n = Number(value.trim())
    return Number.isSafeInteger(n) ? n : undefined
  }
  return undefined
}

/** A required integer in `[min, max]`. */
export const integer = (
  params: Params,
  name: string,
  range: { readonly min?: number; readonly max?: number } = {}
): Effect.Effect<number, ApiError> =>
  Effect.flatMap(single(params, name), (value) => {
    const n = toInteger(value)
    if (n === undefined) return Effect.fail(parameterError(name, "Expected integer value."))
    if (range.min !== undefined && n < range.min) {
      return Effect.fail(parameterError(name, `value must have a minimum value of ${range.min} (got ${n})`))
    }
    if (range.max !== undefined && n > range.max) {
      return Effect.fail(parameterError(name, `value must have a maximum value of ${range.max} (got ${n})`))
    }
    return Effect.succeed(n)
  })

/** A required string, optionally matching a pattern. */
export const string = (params: Params, name: string, pattern?: RegExp): Effect.Effect<string, ApiError> =>
  Effect.flatMap(single(params, name), (value) => {
    if (typeof value !== "string") return Effect.fail(parameterError(name, "Expected string value."))
    if (pattern !== undefined && !pattern.test(value)) {
      return Effect.fail(parameterError(name, "value does not match the regex pattern"))
    }
    return Effect.succeed(value)
  })

/** An optional string. */
export const optionalString = (
  params: Params,
  name: string,
  pattern?: RegExp
): Effect.Effect<string | undefined, ApiError> =>
  params.has(name) ? string(params, name, pattern) : Effect.succeed(undefined)

/** An optional boolean (`true`/`false`, `1`/`0`, `yes`/`no`, `on`/`off`). */
export const optionalBoolean = (params: Params, name: string): Effect.Effect<boolean, ApiError> =>
  params.has(name)
    ? Effect.flatMap(single(params, name), (value) => {
      if (typeof value === "boolean") return Effect.succeed(value)
      const text = String(value).toLowerCase()
      if (["1", "true", "yes", "on"].includes(text)) return Effect.succeed(true)
      if (["0", "false", "no", "off"].includes(text)) return Effect.succeed(false)
      return Effect.fail(parameterError(name, "Unable to parse boolean option."))
    })
    : Effect.succeed(false)

/** A required array (a JSON array, or repeated query/form keys). */
export const array = (params: Params, name: string): Effect.Effect<ReadonlyArray<unknown>, ApiError> => {
  const values = params.get(name)
  if (values === undefined) return Effect.fail(parameterError(name, "parameter is missing."))
  if (values.length === 1 && Array.isArray(values[0])) return Effect.succeed(values[0] as ReadonlyArray<unknown>)
  return Effect.succeed(values)
}

/** Chunk digests in the API: exactly 64 lowercase hex characters. */
export const DIGEST = /^[a-f0-9]{64}$/

/** Archive names. */
export const archiveName = (params: Params, name: string): Effect.Effect<string, ApiError> =>
  Effect.flatMap(string(params, name), (value) =>
    Snapshot.isArchiveName(value)
      ? Effect.succeed(value)
      : Effect.fail(parameterError(name, "value does not match the regex pattern")))

/** The snapshot parameters of the upgrade requests and the admin API. */
export const snapshotId = (params: Params): Effect.Effect<Snapshot.SnapshotId, ApiError> =>
  Effect.gen(function*() {
    const backupType = yield* string(params, "backup-type")
    if (!Snapshot.isBackupType(backupType)) {
      return yield* Effect.fail(
        parameterError("backup-type", `value '${backupType}' is not defined in the enumeration.`)
      )
    }
    const backupId = yield* string(params, "backup-id")
    if (!Snapshot.isSafeId(backupId)) {
      return yield* Effect.fail(parameterError("backup-id", "value does not match the regex pattern"))
    }
    const backupTime = yield* integer(params, "backup-time", { min: 1 })
    const ns = yield* namespace(params)
    return { backupType, backupId, backupTime, ns: ns.join("/") }
  })

/** The optional `ns` parameter, as components. */
export const namespace = (params: Params): Effect.Effect<ReadonlyArray<string>, ApiError> =>
  Effect.flatMap(optionalString(params, "ns"), (ns) => {
    const parts = Snapshot.parseNamespace(ns)
    return parts === undefined
      ? Effect.fail(parameterError("ns", "value does not match the regex pattern"))
      : Effect.succeed(parts)
  })
