'use strict';
// Runs the warmpool-action binary with one command (main, post, scale-up, checkout, drain), passing the runner's
// environment and stdio through. No npm dependencies. The binary is found, in order:
//   1. $WARMPOOL_ACTION_BIN;
//   2. bin/warmpool-action-<os>-<arch> inside the action (a release checkout that vendors it);
//   3. the tool cache of an earlier step;
//   4. a download of the release asset, whose SHA-256 must match the published .sha256 file;
//   5. `cargo install --path` of the action's own checkout, when cargo is available.
const { spawnSync } = require('node:child_process');
const crypto = require('node:crypto');
const fs = require('node:fs');
const os = require('node:os');
const path = require('node:path');

const ACTION_ROOT = path.resolve(__dirname, '..');
const VERSION = '0.1.0';
const RELEASES = process.env.WARMPOOL_ACTION_RELEASES || 'https://github.com/warmpool/warmpool/releases/download';

function platform() {
  const osName = { linux: 'linux', darwin: 'macos', win32: 'windows' }[process.platform];
  const arch = { x64: 'x86_64', arm64: 'aarch64' }[process.arch];
  if (!osName || !arch) throw new Error(`unsupported runner ${process.platform}/${process.arch}`);
  return `${osName}-${arch}`;
}

function exe(name) {
  return process.platform === 'win32' ? `${name}.exe` : name;
}

function cacheDir() {
  const base = process.env.RUNNER_TOOL_CACHE || path.join(os.tmpdir(), 'warmpool-action-cache');
  return path.join(base, 'warmpool-action', VERSION, platform());
}

async function fetchBytes(url) {
  const res = await fetch(url, { redirect: 'follow' });
  if (!res.ok) throw new Error(`GET ${url}: HTTP ${res.status}`);
  return Buffer.from(await res.arrayBuffer());
}

async function download(target) {
  const asset = `${RELEASES}/v${VERSION}/${exe(`warmpool-action-${platform()}`)}`;
  const [binary, sumFile] = await Promise.all([fetchBytes(asset), fetchBytes(`${asset}.sha256`)]);
  const expected = sumFile.toString('utf8').trim().split(/\s+/)[0].toLowerCase();
  const actual = crypto.createHash('sha256').update(binary).digest('hex');
  if (expected !== actual) throw new Error(`checksum mismatch for ${asset}: expected ${expected}, got ${actual}`);
  fs.mkdirSync(path.dirname(target), { recursive: true });
  fs.writeFileSync(target, binary, { mode: 0o755 });
  return target;
}

function cargoInstall(root) {
  const r = spawnSync('cargo', ['install', '--locked', '--path', ACTION_ROOT, '--root', root], { stdio: ['ignore', 2, 2] });
  if (r.status !== 0) throw new Error('cargo install failed');
  return path.join(root, 'bin', exe('warmpool-action'));
}

async function locate() {
  if (process.env.WARMPOOL_ACTION_BIN) return process.env.WARMPOOL_ACTION_BIN;
  const vendored = path.join(ACTION_ROOT, 'bin', exe(`warmpool-action-${platform()}`));
  if (fs.existsSync(vendored)) return vendored;
  const cached = path.join(cacheDir(), exe('warmpool-action'));
  if (fs.existsSync(cached)) return cached;
  try {
    return await download(cached);
  } catch (err) {
    console.log(`::warning::cannot download warmpool-action (${err.message}); building it with cargo`);
    return cargoInstall(cacheDir());
  }
}

async function run(command) {
  let bin;
  try {
    bin = await locate();
  } catch (err) {
    console.log(`::error title=warmpool-action::${String(err.message).replace(/%/g, '%25').replace(/\r/g, '%0D').replace(/\n/g, '%0A')}`);
    process.exitCode = 1;
    return;
  }
  const r = spawnSync(bin, [command], { stdio: 'inherit', env: process.env });
  if (r.error) {
    console.log(`::error title=warmpool-action::cannot run ${bin}: ${r.error.message}`);
    process.exitCode = 1;
    return;
  }
  process.exitCode = r.status === null ? 1 : r.status;
}

module.exports = { run, locate, platform };
