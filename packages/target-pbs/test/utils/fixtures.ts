/**
 * Shared fixtures of the client tests: a scoped temporary directory, the in-repo PBS test server,
 * a client pinned to its certificate, and small synthetic disk images with holes.
 */
import { Effect, Redacted } from "effect"
import * as crypto from "node:crypto"
import * as fs from "node:fs"
import * as os from "node:os"
import * as path from "node:path"
import * as FixedIndex from "../../src/FixedIndex.js"
import * as PbsClient from "../../src/PbsClient.js"
import * as PbsTestServer from "../../src/testing/PbsTestServer.js"

export const CS = FixedIndex.CHUNK_SIZE
export const TOKEN_ID = "backup@pbs!test"
export const TOKEN_SECRET = "t0ken-s3cret"
export const USER = "alice@pbs"
export const PASSWORD = "alice-passw0rd"
export const T0 = 1717588800

export const tempDir = Effect.acquireRelease(
  Effect.sync(() => fs.mkdtempSync(path.join(os.tmpdir(), "pbs-cli-"))),
  (dir) => Effect.sync(() => fs.rmSync(dir, { recursive: true, force: true }))
)

export const startServer = (options: Partial<PbsTestServer.PbsTestServerOptions> = {}) =>
  Effect.gen(function*() {
    const dir = yield* tempDir
    const store = path.join(dir, "store1")
    const server = yield* PbsTestServer.make({
      datastores: [{ name: "store1", path: store }],
      users: [{ userid: USER, password: Redacted.make(PASSWORD) }],
      tokens: [{ tokenid: TOKEN_ID, secret: Redacted.make(TOKEN_SECRET) }],
      ...options
    })
    return { server, store, dir }
  })

export const tokenAuth: PbsClient.PbsAuth = { _tag: "ApiToken", tokenId: TOKEN_ID, secret: Redacted.make(TOKEN_SECRET) }

export const makeClient = (
  server: PbsTestServer.PbsTestServerService,
  overrides: Partial<PbsClient.PbsClientOptions> = {}
) =>
  PbsClient.make({
    host: "127.0.0.1",
    port: server.port,
    datastore: "store1",
    auth: tokenAuth,
    fingerprint: server.fingerprint,
    ...overrides
  })

export type Slot = "random" | "zero" | "half" | "hole"

/**
 * A raw image of `slots` 4 MiB slots plus an optional random tail; "hole" slots are left
 * unwritten (sparse), "zero" slots are written zeros, "half" is half random data.
 */
export const makeDisk = (file: string, slots: ReadonlyArray<Slot>, tail = 0): void => {
  const size = slots.length * CS + tail
  const fd = fs.openSync(file, "w")
  try {
    fs.ftruncateSync(fd, size)
    slots.forEach((slot, i) => {
      if (slot === "random") fs.writeSync(fd, crypto.randomBytes(CS), 0, CS, i * CS)
      if (slot === "zero") fs.writeSync(fd, Buffer.alloc(CS), 0, CS, i * CS)
      if (slot === "half") fs.writeSync(fd, crypto.randomBytes(CS / 2), 0, CS / 2, i * CS + CS / 4)
    })
    if (tail > 0) fs.writeSync(fd, crypto.randomBytes(tail), 0, tail, slots.length * CS)
  } finally {
    fs.closeSync(fd)
  }
}

/** Overwrites a few bytes inside slot `slot`. */
export const touchSlot = (file: string, slot: number): void => {
  const fd = fs.openSync(file, "r+")
  try {
    fs.writeSync(fd, crypto.randomBytes(64), 0, 64, slot * CS + 1000)
  } finally {
    fs.closeSync(fd)
  }
}

export const sha256File = (file: string): string => crypto.createHash("sha256").update(fs.readFileSync(file)).digest("hex")

export const settle = (server: PbsTestServer.PbsTestServerService) =>
  Effect.gen(function*() {
    for (let i = 0; i < 300 && (yield* server.activeSessions) > 0; i++) yield* Effect.sleep("10 millis")
  })

export const vmConfig = (devices: ReadonlyArray<string>) =>
  ["boot: order=scsi0", "memory: 512", ...devices.map((d) => `${d}: local:vm-100-disk-${d}.raw,size=8M`), ...devices.map(
    (d) => `#qmdump#map:${d}:drive-${d}:local:raw:`
  )].join("\n") + "\n"

/** The client with every backup session's `uploadFixedChunk` wrapped (delays, gates and counters of tests). */
export const wrapUploads = (
  client: PbsClient.PbsClientService,
  wrap: (upload: PbsClient.BackupProtocol["uploadFixedChunk"]) => PbsClient.BackupProtocol["uploadFixedChunk"]
): PbsClient.PbsClientService => ({
  ...client,
  openBackup: (id) =>
    Effect.map(client.openBackup(id), (protocol) => ({ ...protocol, uploadFixedChunk: wrap(protocol.uploadFixedChunk) }))
})
