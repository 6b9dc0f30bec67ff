// A static file server on 127.0.0.1 (random port) for the headless-Chromium tests and benchmarks: files under
// `root`, no `..`, `index.html` for a folder, content types by extension.
import http from "node:http";
import { readFile } from "node:fs/promises";
import { extname, normalize } from "node:path";

const types = { ".html": "text/html", ".js": "text/javascript", ".mjs": "text/javascript", ".wasm": "application/wasm", ".json": "application/json", ".css": "text/css", ".png": "image/png" };

export async function serve(root, port = 0) {
  const server = http.createServer(async (req, res) => {
    let path = normalize(decodeURIComponent(new URL(req.url, "http://x").pathname));
    if (path.endsWith("/")) path += "index.html";
    if (path.includes("..")) return res.writeHead(403).end();
    if (path === "/favicon.ico") return res.writeHead(204).end();
    try {
      const body = await readFile(root + path);
      res.writeHead(200, { "content-type": types[extname(path)] ?? "application/octet-stream" }).end(body);
    } catch {
      res.writeHead(404).end();
    }
  });
  await new Promise((r) => server.listen(port, "127.0.0.1", r));
  return { server, origin: `http://127.0.0.1:${server.address().port}` };
}
