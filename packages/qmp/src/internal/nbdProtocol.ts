/**
 * NBD wire constants and encoders (fixed newstyle handshake, transmission phase with simple and
 * structured replies). Numbers follow NetworkBlockDevice/nbd doc/proto.md; everything is big endian.
 *
 * @internal
 */

/** "NBDMAGIC", first 8 bytes sent by a newstyle server. */
export const NBDMAGIC_HI = 0x4e42444d
export const NBDMAGIC_LO = 0x41474943
/** "IHAVEOPT", second magic of newstyle servers and prefix of every client option. */
export const IHAVEOPT_HI = 0x49484156
export const IHAVEOPT_LO = 0x454f5054
/** Second magic of the old-style handshake (unsupported). */
export const OLDSTYLE_HI = 0x00000000
export const OLDSTYLE_LO = 0x00420281
/** Magic of option replies: 0x0003e889045565a9. */
export const OPT_REPLY_MAGIC_HI = 0x0003e889
export const OPT_REPLY_MAGIC_LO = 0x045565a9

export const REQUEST_MAGIC = 0x25609513
export const SIMPLE_REPLY_MAGIC = 0x67446698
export const STRUCTURED_REPLY_MAGIC = 0x668e33ef

// handshake flags (server) and client flags
export const FLAG_FIXED_NEWSTYLE = 1
export const FLAG_NO_ZEROES = 2
export const FLAG_C_FIXED_NEWSTYLE = 1
export const FLAG_C_NO_ZEROES = 2

// options
export const OPT_EXPORT_NAME = 1
export const OPT_ABORT = 2
export const OPT_LIST = 3
export const OPT_STARTTLS = 5
export const OPT_INFO = 6
export const OPT_GO = 7
export const OPT_STRUCTURED_REPLY = 8
export const OPT_LIST_META_CONTEXT = 9
export const OPT_SET_META_CONTEXT = 10

// option reply types
export const REP_ACK = 1
export const REP_SERVER = 2
export const REP_INFO = 3
export const REP_META_CONTEXT = 4
export const REP_ERR_BIT = 0x80000000
export const REP_ERR_UNSUP = 0x80000001
export const REP_ERR_POLICY = 0x80000002
export const REP_ERR_INVALID = 0x80000003
export const REP_ERR_PLATFORM = 0x80000004
export const REP_ERR_TLS_REQD = 0x80000005
export const REP_ERR_UNKNOWN = 0x80000006
export const REP_ERR_SHUTDOWN = 0x80000007
export const REP_ERR_BLOCK_SIZE_REQD = 0x80000008
export const REP_ERR_TOO_BIG = 0x80000009

// NBD_INFO types (NBD_REP_INFO payloads and NBD_OPT_GO requests)
export const INFO_EXPORT = 0
export const INFO_NAME = 1
export const INFO_DESCRIPTION = 2
export const INFO_BLOCK_SIZE = 3

// transmission flags
export const TFLAG_HAS_FLAGS = 1 << 0
export const TFLAG_READ_ONLY = 1 << 1
export const TFLAG_SEND_FLUSH = 1 << 2
export const TFLAG_SEND_FUA = 1 << 3
export const TFLAG_ROTATIONAL = 1 << 4
export const TFLAG_SEND_TRIM = 1 << 5
export const TFLAG_SEND_WRITE_ZEROES = 1 << 6
export const TFLAG_SEND_DF = 1 << 7
export const TFLAG_CAN_MULTI_CONN = 1 << 8

// commands
export const CMD_READ = 0
export const CMD_WRITE = 1
export const CMD_DISC = 2
export const CMD_FLUSH = 3
export const CMD_TRIM = 4
export const CMD_CACHE = 5
export const CMD_WRITE_ZEROES = 6
export const CMD_BLOCK_STATUS = 7

// structured reply flags and chunk types
export const REPLY_FLAG_DONE = 1
export const REPLY_TYPE_NONE = 0
export const REPLY_TYPE_OFFSET_DATA = 1
export const REPLY_TYPE_OFFSET_HOLE = 2
export const REPLY_TYPE_BLOCK_STATUS = 5
export const REPLY_TYPE_ERROR_BIT = 0x8000
export const REPLY_TYPE_ERROR = 0x8001
export const REPLY_TYPE_ERROR_OFFSET = 0x8002

/** Default limits when the server sends no NBD_INFO_BLOCK_SIZE. */
export const DEFAULT_MAX_BLOCK = 32 * 1024 * 1024

const optionNames: Record<number, string> = {
  [OPT_EXPORT_NAME]: "NBD_OPT_EXPORT_NAME",
  [OPT_ABORT]: "NBD_OPT_ABORT",
  [OPT_LIST]: "NBD_OPT_LIST",
  [OPT_STARTTLS]: "NBD_OPT_STARTTLS",
  [OPT_INFO]: "NBD_OPT_INFO",
  [OPT_GO]: "NBD_OPT_GO",
  [OPT_STRUCTURED_REPLY]: "NBD_OPT_STRUCTURED_REPLY",
  [OPT_LIST_META_CONTEXT]: "NBD_OPT_LIST_META_CONTEXT",
  [OPT_SET_META_CONTEXT]: "NBD_OPT_SET_META_CONTEXT"
}

/** Name of an option code, e.g. `NBD_OPT_GO`. */
export const optionName = (option: number): string => optionNames[option] ?? `NBD_OPT_${option}`

const replyNames: Record<number, string> = {
  [REP_ACK]: "NBD_REP_ACK",
  [REP_SERVER]: "NBD_REP_SERVER",
  [REP_INFO]: "NBD_REP_INFO",
  [REP_META_CONTEXT]: "NBD_REP_META_CONTEXT",
  [REP_ERR_UNSUP]: "NBD_REP_ERR_UNSUP",
  [REP_ERR_POLICY]: "NBD_REP_ERR_POLICY",
  [REP_ERR_INVALID]: "NBD_REP_ERR_INVALID",
  [REP_ERR_PLATFORM]: "NBD_REP_ERR_PLATFORM",
  [REP_ERR_TLS_REQD]: "NBD_REP_ERR_TLS_REQD",
  [REP_ERR_UNKNOWN]: "NBD_REP_ERR_UNKNOWN",
  [REP_ERR_SHUTDOWN]: "NBD_REP_ERR_SHUTDOWN",
  [REP_ERR_BLOCK_SIZE_REQD]: "NBD_REP_ERR_BLOCK_SIZE_REQD",
  [REP_ERR_TOO_BIG]: "NBD_REP_ERR_TOO_BIG"
}

/** Name of an option reply type, e.g. `NBD_REP_ERR_UNKNOWN`. */
export const replyName = (reply: number): string =>
  replyNames[reply] ?? ((reply & REP_ERR_BIT) !== 0 ? `NBD_REP_ERR_${reply & 0x7fffffff}` : `NBD_REP_${reply}`)

const commandNames: Record<number, string> = {
  [CMD_READ]: "NBD_CMD_READ",
  [CMD_WRITE]: "NBD_CMD_WRITE",
  [CMD_DISC]: "NBD_CMD_DISC",
  [CMD_FLUSH]: "NBD_CMD_FLUSH",
  [CMD_TRIM]: "NBD_CMD_TRIM",
  [CMD_CACHE]: "NBD_CMD_CACHE",
  [CMD_WRITE_ZEROES]: "NBD_CMD_WRITE_ZEROES",
  [CMD_BLOCK_STATUS]: "NBD_CMD_BLOCK_STATUS"
}

/** Name of a command code, e.g. `NBD_CMD_READ`. */
export const commandName = (command: number): string => commandNames[command] ?? `NBD_CMD_${command}`

const errnoNames: Record<number, string> = {
  1: "EPERM",
  5: "EIO",
  12: "ENOMEM",
  22: "EINVAL",
  28: "ENOSPC",
  75: "EOVERFLOW",
  95: "ENOTSUP",
  108: "ESHUTDOWN"
}

/** Symbolic name of an NBD error value (the protocol's fixed errno numbering). */
export const errnoName = (errno: number): string => errnoNames[errno] ?? `errno ${errno}`

/** Offsets are 64-bit on the wire; JavaScript numbers are exact up to 2^53. */
export const MAX_SAFE_HI = 0x1fffff

/** Reads a 64-bit unsigned value, or -1 when it does not fit a safe integer. */
export const readU64 = (buf: Buffer, at: number): number => {
  const hi = buf.readUInt32BE(at)
  if (hi > MAX_SAFE_HI) return -1
  return hi * 0x100000000 + buf.readUInt32BE(at + 4)
}

/** Writes a non-negative safe integer as a 64-bit unsigned value. */
export const writeU64 = (buf: Buffer, value: number, at: number): void => {
  buf.writeUInt32BE(Math.floor(value / 0x100000000), at)
  buf.writeUInt32BE(value >>> 0, at + 4)
}

/** Client option: IHAVEOPT, option, length, data. */
export const encodeOption = (option: number, data: Buffer = Buffer.alloc(0)): Buffer => {
  const buf = Buffer.allocUnsafe(16 + data.length)
  buf.writeUInt32BE(IHAVEOPT_HI, 0)
  buf.writeUInt32BE(IHAVEOPT_LO, 4)
  buf.writeUInt32BE(option, 8)
  buf.writeUInt32BE(data.length, 12)
  data.copy(buf, 16)
  return buf
}

/** NBD_OPT_GO data: export name and the list of NBD_INFO requests. */
export const encodeGo = (exportName: string, infos: ReadonlyArray<number>): Buffer => {
  const name = Buffer.from(exportName, "utf8")
  const data = Buffer.allocUnsafe(4 + name.length + 2 + 2 * infos.length)
  data.writeUInt32BE(name.length, 0)
  name.copy(data, 4)
  let at = 4 + name.length
  data.writeUInt16BE(infos.length, at)
  at += 2
  for (const info of infos) {
    data.writeUInt16BE(info, at)
    at += 2
  }
  return encodeOption(OPT_GO, data)
}

/** NBD_OPT_SET_META_CONTEXT data: export name and the queries. */
export const encodeSetMetaContext = (exportName: string, queries: ReadonlyArray<string>): Buffer => {
  const name = Buffer.from(exportName, "utf8")
  const encoded = queries.map((q) => Buffer.from(q, "utf8"))
  const size = 4 + name.length + 4 + encoded.reduce((n, q) => n + 4 + q.length, 0)
  const data = Buffer.allocUnsafe(size)
  data.writeUInt32BE(name.length, 0)
  name.copy(data, 4)
  let at = 4 + name.length
  data.writeUInt32BE(encoded.length, at)
  at += 4
  for (const q of encoded) {
    data.writeUInt32BE(q.length, at)
    q.copy(data, at + 4)
    at += 4 + q.length
  }
  return encodeOption(OPT_SET_META_CONTEXT, data)
}

/** Transmission request: magic, flags, type, cookie, offset, length (28 bytes). */
export const encodeRequest = (
  command: number,
  flags: number,
  cookie: number,
  offset: number,
  length: number
): Buffer => {
  const buf = Buffer.allocUnsafe(28)
  buf.writeUInt32BE(REQUEST_MAGIC, 0)
  buf.writeUInt16BE(flags, 4)
  buf.writeUInt16BE(command, 6)
  buf.writeUInt32BE(0, 8)
  buf.writeUInt32BE(cookie, 12)
  writeU64(buf, offset, 16)
  buf.writeUInt32BE(length, 24)
  return buf
}
