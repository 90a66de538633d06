'use strict';
// Runs the warmpool-action binary with one command (main, post, scale-up, checkout, drain), passing the runner's
// environment and stdio through. No npm dependencies. The binary is found, in order:
//   1. $WARMPOOL_ACTION_BIN;
//   2. bin/warmpool-action-<os>-<arch> inside the action (a release checkout that vendors it);
//   3. the tool cache of an earlier step;
//   4. a download of the release asset, whose SHA-256 must match the published .sha256 file;
//   5. `cargo install --path` of the action's own checkout, when cargo is available.
// `main` and `checkout` also put the `warmpool` CLI on the job's PATH (GITHUB_PATH) for the steps after them,
// found the same way ($WARMPOOL_CLI_BIN, bin/warmpool-<os>-<arch>, ..., `cargo install --path server`).
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

const TOOLS = {
  action: { name: 'warmpool-action', env: 'WARMPOOL_ACTION_BIN', crate: ACTION_ROOT },
  cli: { name: 'warmpool', env: 'WARMPOOL_CLI_BIN', crate: path.join(ACTION_ROOT, '..', 'server') },
};

function cacheDir(tool) {
  const base = process.env.RUNNER_TOOL_CACHE || path.join(os.tmpdir(), 'warmpool-action-cache');
  return path.join(base, tool.name, VERSION, platform());
}

async function fetchBytes(url) {
  const res = await fetch(url, { redirect: 'follow' });
  if (!res.ok) throw new Error(`GET ${url}: HTTP ${res.status}`);
  return Buffer.from(await res.arrayBuffer());
}

async function download(tool, target) {
  const asset = `${RELEASES}/v${VERSION}/${exe(`${tool.name}-${platform()}`)}`;
  const [binary, sumFile] = await Promise.all([fetchBytes(asset), fetchBytes(`${asset}.sha256`)]);
  const expected = sumFile.toString('utf8').trim().split(/\s+/)[0].toLowerCase();
  const actual = crypto.createHash('sha256').update(binary).digest('hex');
  if (expected !== actual) throw new Error(`checksum mismatch for ${asset}: expected ${expected}, got ${actual}`);
  fs.mkdirSync(path.dirname(target), { recursive: true });
  fs.writeFileSync(target, binary, { mode: 0o755 });
  return target;
}

function cargoInstall(tool, root) {
  const args = ['install', '--locked', '--path', tool.crate, '--root', root, '--bin', tool.name];
  const r = spawnSync('cargo', args, { stdio: ['ignore', 2, 2] });
  if (r.status !== 0) throw new Error('cargo install failed');
  return path.join(root, 'bin', exe(tool.name));
}

async function locate(tool = TOOLS.action) {
  if (process.env[tool.env]) return process.env[tool.env];
  const vendored = path.join(ACTION_ROOT, 'bin', exe(`${tool.name}-${platform()}`));
  if (fs.existsSync(vendored)) return vendored;
  const cached = path.join(cacheDir(tool), exe(tool.name));
  if (fs.existsSync(cached)) return cached;
  try {
    return await download(tool, cached);
  } catch (err) {
    console.log(`::warning::cannot download ${tool.name} (${err.message}); building it with cargo`);
    return cargoInstall(tool, cacheDir(tool));
  }
}

// Puts a directory holding `warmpool` on the PATH of the job's later steps. A missing CLI is a warning: the
// action itself does not need it.
async function exposeCli() {
  if (!process.env.GITHUB_PATH) return;
  try {
    const bin = await locate(TOOLS.cli);
    const dir = path.join(cacheDir(TOOLS.cli), 'path');
    fs.mkdirSync(dir, { recursive: true });
    const target = path.join(dir, exe('warmpool'));
    if (path.resolve(bin) !== target) fs.copyFileSync(bin, target);
    fs.chmodSync(target, 0o755);
    fs.appendFileSync(process.env.GITHUB_PATH, `${dir}${os.EOL}`);
  } catch (err) {
    console.log(`::warning title=warmpool-action::the warmpool CLI is not on PATH (${err.message})`);
  }
}

async function run(command) {
  if (command === 'main' || command === 'checkout') await exposeCli();
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
