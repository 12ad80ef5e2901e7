/**
 * A child process for the `Usocket` test, run with `--expose-gc`: opens and closes usocket sockets `rounds` times
 * in one of the ways they close, forcing a garbage collection right after every close (the moment a plain usocket
 * frees a poll handle libuv is still closing, which aborts the process). Prints one JSON line at the end.
 *
 * Ways of closing: `client`: the client destroys its socket; `reset`: the peer closes with our byte unread (an
 * error, on which the addon closes the socket by itself); `server`: the server destroys the connection it
 * accepted, then closes itself.
 */
import * as Fs from "node:fs"
import * as Net from "node:net"
import * as Path from "node:path"
import { closingCount, SafeUServer, SafeUSocket } from "../../src/Usocket.js"

const [dir, way, roundsText] = process.argv.slice(2)
const rounds = Number(roundsText)
const gc = (globalThis as { gc?: () => void }).gc
if (gc === undefined || dir === undefined) {
  throw new Error("usage: node --expose-gc --import tsx usocketChurn.ts <dir> <client|reset|server> <rounds>")
}
// Now, and later in this turn of the loop (immediates run before libuv finishes the handles closed in the turn).
const collect = () => {
  gc()
  setImmediate(gc)
}
// Allocations between rounds, so that freed native memory gets reused.
const churn = () => Array.from({ length: 200 }, () => Buffer.alloc(300))

const netServer = (path: string, onConnection: (socket: Net.Socket) => void) =>
  new Promise<Net.Server>((resolve) => {
    Fs.rmSync(path, { force: true })
    const server = Net.createServer({ pauseOnConnect: true }, (socket) => {
      socket.on("error", () => {})
      onConnection(socket)
    })
    server.listen(path, () => resolve(server))
  })

const connectClient = (path: string, onConnected: (socket: SafeUSocket) => void) => {
  const socket = new SafeUSocket()
  socket.on("error", () => {})
  socket.once("connected", () => onConnected(socket))
  socket.connect(path)
}

const clientDestroys = async (path: string) => {
  const server = await netServer(path, () => {})
  for (let i = 0; i < rounds; i++) {
    await new Promise<void>((resolve) =>
      connectClient(path, (socket) => {
        socket.destroy()
        collect()
        resolve()
      })
    )
    churn()
  }
  server.close()
}

const peerResets = async (path: string) => {
  // The server never reads: closing with our byte unread fails our socket (the addon's poll reports EBADF).
  const server = await netServer(path, (socket) => setTimeout(() => socket.destroy(), 2))
  let errors = 0
  for (let i = 0; i < rounds; i++) {
    await new Promise<void>((resolve) =>
      connectClient(path, (socket) => {
        socket.once("close", () => {
          errors++
          collect()
          resolve()
        })
        // A plain end of stream instead (not expected): close it ourselves.
        socket.once("end", () => {
          socket.destroy()
          resolve()
        })
        socket.write(Buffer.from("x"))
        socket.resume()
      })
    )
    churn()
  }
  server.close()
  return errors
}

const serverSide = async (path: string) => {
  Fs.rmSync(path, { force: true })
  for (let i = 0; i < rounds; i++) {
    const server = new SafeUServer()
    server.on("connection", (socket: SafeUSocket) => {
      socket.destroy()
      collect()
    })
    await new Promise<void>((resolve) => server.listen(path, 16, () => resolve()))
    await new Promise<void>((resolve) => {
      const client = Net.connect(path)
      client.on("error", () => {})
      client.on("close", () => resolve())
      client.resume()
    })
    server.close()
    collect()
    churn()
    Fs.rmSync(path, { force: true })
  }
}

const main = async () => {
  const path = Path.join(dir, `${way}.sock`)
  const resets = way === "client" ? await clientDestroys(path).then(() => 0)
    : way === "reset" ? await peerResets(path)
    : way === "server" ? await serverSide(path).then(() => 0)
    : await Promise.reject(new Error(`unknown way of closing: ${way}`))
  // Nothing kept for longer than it takes libuv to finish closing.
  await new Promise((resolve) => setImmediate(() => setImmediate(resolve)))
  console.log(JSON.stringify({ rounds, resets, keptAfterTwoTurns: closingCount() }))
}

void main()
