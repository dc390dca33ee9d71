"use strict";
// Loading data files with <script> tags (fetch() of local files is blocked on file:// URLs).
function loadScript(src) {
  return new Promise(function (resolve, reject) {
    var tag = document.createElement("script");
    tag.src = src; tag.onload = resolve;
    tag.onerror = function () { reject(new Error("cannot load " + src)); };
    document.head.appendChild(tag);
  });
}
function el(tag, attrs, children) {
  var node = document.createElement(tag);
  Object.keys(attrs || {}).forEach(function (key) {
    if (key === "text") node.textContent = attrs[key]; else if (key === "cls") node.className = attrs[key]; else node.setAttribute(key, attrs[key]);
  });
  (children || []).forEach(function (child) { node.appendChild(typeof child === "string" ? document.createTextNode(child) : child); });
  return node;
}
function fmt(value, digits) {
  if (value === null || value === undefined) return "\u2013";
  if (typeof value !== "number") return String(value);
  return Math.abs(value) > 0 && Math.abs(value) < 1e-3 ? value.toExponential(2) : value.toFixed(digits === undefined ? 3 : digits);
}
window.BROWSER_LISTS = window.BROWSER_LISTS || {};
window.BROWSER_CHUNKS = window.BROWSER_CHUNKS || {};
