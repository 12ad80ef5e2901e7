/**
 * Authentication of the test server (spec §6.2): API tokens
 * (`Authorization: PBSAPIToken=<user@realm!name>:<secret>`, space or `=`, secret percent-decoded),
 * ticket login (`POST /api2/json/access/ticket`), the `PBSAuthCookie` ticket with a
 * `CSRFPreventionToken` on every non-GET request. Tickets are HMAC-signed with a per-server secret
 * and valid for two hours.
 */
import * as crypto from "node:crypto"
import * as Either from "effect/Either"
import * as Redacted from "effect/Redacted"
import { ApiError } from "./apiError.js"

export type Privilege = "Datastore.Backup" | "Datastore.Read"

export interface Identity {
  /** `user@realm` or `user@realm!token`. */
  readonly authId: string
  readonly userid: string
  readonly isToken: boolean
  readonly privileges: ReadonlySet<Privilege>
}

export interface UserEntry {
  readonly userid: string
  readonly password: Redacted.Redacted<string>
  readonly privileges?: ReadonlyArray<Privilege> | undefined
}

export interface TokenEntry {
  readonly tokenid: string
  readonly secret: Redacted.Redacted<string>
  readonly privileges?: ReadonlyArray<Privilege> | undefined
}

const ALL: ReadonlyArray<Privilege> = ["Datastore.Backup", "Datastore.Read"]
const TICKET_LIFETIME = 7200

const equalSecret = (a: string, b: string): boolean => {
  const x = crypto.createHash("sha256").update(a).digest()
  const y = crypto.createHash("sha256").update(b).digest()
  return crypto.timingSafeEqual(x, y) && a.length === b.length
}

export interface Authenticator {
  readonly login: (username: string, password: string, now: number) => Either.Either<
    { readonly username: string; readonly ticket: string; readonly csrf: string },
    ApiError
  >
  readonly authenticate: (
    headers: Readonly<Record<string, string | ReadonlyArray<string> | undefined>>,
    method: string,
    now: number
  ) => Either.Either<Identity, ApiError>
}

const unauthorized = (why: string) => Either.left(new ApiError({ status: 401, text: `authentication failed - ${why}` }))

const header = (
  headers: Readonly<Record<string, string | ReadonlyArray<string> | undefined>>,
  name: string
): string | undefined => {
  const value = headers[name]
  return typeof value === "string" ? value : value?.[0]
}

export const makeAuthenticator = (
  users: ReadonlyArray<UserEntry>,
  tokens: ReadonlyArray<TokenEntry>
): Authenticator => {
  const secret = crypto.randomBytes(32)
  const mac = (text: string) => crypto.createHmac("sha256", secret).update(text).digest("base64")
  const userMap = new Map(users.map((u) => [u.userid, u]))
  const tokenMap = new Map(tokens.map((t) => [t.tokenid, t]))

  const makeTicket = (userid: string, now: number) => {
    const data = `PBS:${userid}:${now.toString(16).toUpperCase().padStart(8, "0")}`
    return `${data}::${mac(data)}`
  }
  const makeCsrf = (userid: string, now: number) => {
    const stamp = now.toString(16).toUpperCase().padStart(8, "0")
    return `${stamp}:${mac(`${stamp}:${userid}`)}`
  }
  const verifyTicket = (ticket: string, now: number): string | undefined => {
    const m = /^PBS:([^:]+):([0-9A-F]{8})::(.+)$/.exec(ticket)
    if (m === null) return undefined
    const data = `PBS:${m[1]}:${m[2]}`
    if (!equalSecret(mac(data), m[3]!)) return undefined
    const age = now - parseInt(m[2]!, 16)
    if (age > TICKET_LIFETIME || age < -300) return undefined
    return userMap.has(m[1]!) ? m[1]! : undefined
  }
  const verifyCsrf = (token: string, userid: string, now: number): boolean => {
    const m = /^([0-9A-F]{8}):(.+)$/.exec(token)
    if (m === null) return false
    const age = now - parseInt(m[1]!, 16)
    return age <= TICKET_LIFETIME && age >= -300 && equalSecret(mac(`${m[1]}:${userid}`), m[2]!)
  }
  const userIdentity = (userid: string): Identity => ({
    authId: userid,
    userid,
    isToken: false,
    privileges: new Set(userMap.get(userid)?.privileges ?? ALL)
  })

  return {
    login: (username, password, now) => {
      const user = userMap.get(username)
      const valid = user !== undefined &&
        (equalSecret(Redacted.value(user.password), password) || verifyTicket(password, now) === username)
      if (!valid) return Either.left(new ApiError({ status: 401, text: "authentication failure" }))
      return Either.right({ username, ticket: makeTicket(username, now), csrf: makeCsrf(username, now) })
    },
    authenticate: (headers, method, now) => {
      const authorization = header(headers, "authorization")
      if (authorization !== undefined) {
        const m = /^PBSAPIToken[= ]([^:]+):(.*)$/.exec(authorization.trim())
        if (m === null) return unauthorized("invalid authorization header")
        const token = tokenMap.get(m[1]!)
        let given: string
        try {
          given = decodeURIComponent(m[2]!)
        } catch {
          return unauthorized("invalid API token secret encoding")
        }
        if (token === undefined || !equalSecret(Redacted.value(token.secret), given)) {
          return unauthorized("invalid API token")
        }
        const userid = token.tokenid.split("!")[0]!
        return Either.right({
          authId: token.tokenid,
          userid,
          isToken: true,
          privileges: new Set(token.privileges ?? ALL)
        })
      }
      const cookie = header(headers, "cookie")
      if (cookie !== undefined) {
        const ticket = cookie.split(";").map((part) => part.trim()).map((part) => {
          const eq = part.indexOf("=")
          return eq < 0 ? ["", ""] as const : [part.slice(0, eq), part.slice(eq + 1)] as const
        }).find(([name]) => name === "PBSAuthCookie" || name === "__Host-PBSAuthCookie")?.[1]
        if (ticket !== undefined) {
          let decoded: string
          try {
            decoded = decodeURIComponent(ticket)
          } catch {
            return unauthorized("invalid ticket encoding")
          }
          const userid = verifyTicket(decoded, now)
          if (userid === undefined) return unauthorized("invalid ticket")
          if (method !== "GET" && method !== "HEAD") {
            const csrf = header(headers, "csrfpreventiontoken")
            if (csrf === undefined || !verifyCsrf(csrf, userid, now)) {
              return unauthorized("invalid CSRF prevention token")
            }
          }
          return Either.right(userIdentity(userid))
        }
      }
      return unauthorized("no authentication credentials provided.")
    }
  }
}

/** Whether `identity` may act as `owner` (itself, or a user over its own tokens). */
export const isOwner = (identity: Identity, owner: string): boolean =>
  owner === identity.authId || (owner.includes("!") && owner.split("!")[0] === identity.authId)
