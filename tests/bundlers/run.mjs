// The npm package through the two bundlers web developers use: a small app (main.js) importing "lorag" is built
// by Vite and by webpack (and by webpack told to ignore the `browser` condition, which takes the package's bundler
// entry) from a project whose node_modules/lorag is pkg/npm (as `npm install` would place it),
// each build served on 127.0.0.1 and run in real headless Chromium: the package's browser entry, its wasm emitted
// as an asset by the bundler and fetched from the build, the embedder loaded, documents added and searched.
// Needs scripts/build-npm [--dev]. Run by scripts/test.
import assert from "node:assert/strict";
import { mkdirSync, rmSync, symlinkSync, writeFileSync, copyFileSync, readdirSync, statSync } from "node:fs";
import { chromium } from "playwright-core";
import { serve } from "../browser/serve.mjs";

const root = new URL("../../", import.meta.url).pathname;
const work = `${root}target/bundlers`;
rmSync(work, { recursive: true, force: true });
mkdirSync(`${work}/app/node_modules`, { recursive: true });
symlinkSync(`${root}pkg/npm`, `${work}/app/node_modules/lorag`);
copyFileSync(new URL("main.js", import.meta.url), `${work}/app/main.js`);
const html = (script) => `<!doctype html><meta charset="utf-8"><title>lorag bundled</title><script type="module" src="${script}"></script>`;
writeFileSync(`${work}/app/index.html`, html("./main.js"));

const quiet = { logLevel: "warn" };
const { build } = await import("vite");
await build({ root: `${work}/app`, base: "./", ...quiet, build: { outDir: `${work}/vite`, emptyOutDir: true, target: "es2022", chunkSizeWarningLimit: 100000 } });

const webpack = (await import("webpack")).default;
// Webpack as it comes (the `browser` condition: web.js), and told to ignore that condition as a bundler that does
// not know it would (the `default` one: bundler.js, the `bundler` wasm build as an ES module import).
const builds = { webpack: {}, "webpack-default": { resolve: { conditionNames: ["import", "module", "default"] }, experiments: { asyncWebAssembly: true } } };
for (const [name, extra] of Object.entries(builds)) {
  await new Promise((resolve, reject) =>
    webpack(
      {
        mode: "production",
        target: "web",
        context: `${work}/app`,
        entry: "./main.js",
        output: { path: `${work}/${name}`, filename: "main.js", publicPath: "auto", clean: true },
        performance: false,
        ...extra,
        experiments: { outputModule: true, ...extra.experiments },
      },
      (err, stats) => (err || stats.hasErrors() ? reject(err ?? new Error(stats.toString("errors-only"))) : resolve()),
    ),
  );
  writeFileSync(`${work}/${name}/index.html`, html("./main.js"));
}

const wasmIn = (dir) => readdirSync(dir, { recursive: true }).filter((f) => f.endsWith(".wasm") && statSync(`${dir}/${f}`).isFile());
const { server, origin } = await serve(root);
const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM ?? "/usr/bin/chromium",
  args: ["--no-sandbox", "--disable-dev-shm-usage", "--disable-background-networking", "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic"],
});
try {
  for (const bundler of ["vite", "webpack", "webpack-default"]) {
    const emitted = wasmIn(`${work}/${bundler}`);
    assert.equal(emitted.length, 1, `${bundler} emitted ${emitted.join()}`);
    const page = await browser.newPage();
    const errors = [];
    page.on("pageerror", (e) => errors.push(String(e)));
    page.on("console", (m) => m.type() === "error" && errors.push(m.text()));
    await page.goto(`${origin}/target/bundlers/${bundler}/index.html`);
    // The bundler entry's wasm is an async module: main.js runs once it has compiled, after the load event.
    await page.waitForFunction(() => window.result !== undefined, null, { timeout: 120000 });
    const out = await page.evaluate(() => window.result);
    assert.ok(out?.ok, `${bundler}: ${out ? out.error : "the app did not run"}; ${errors.join(" | ")}`);
    assert.equal(out.documents, 3);
    assert.match(out.hits[0], /^safety\.html#/);
    assert.deepEqual(out.reopened, out.hits, `${bundler}: the saved pack reopened`);
    // The wasm came from the bundler's output, not from pkg/.
    assert.deepEqual(out.wasm, [`/target/bundlers/${bundler}/${emitted[0]}`]);
    assert.deepEqual(errors, []);
    await page.close();
    console.log(`ok - ${bundler}: import { Lorag } from "lorag" built, its wasm emitted as ${emitted[0]}; embedder loaded, 3 documents added and searched, saved and reopened in ${browser.version()}`);
  }
} finally {
  await browser.close();
  server.close();
}
