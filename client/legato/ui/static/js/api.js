// Calls to the UI server: JSON in, JSON out; changes carry the session's CSRF token.

let csrfToken = "";

export class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

export function useCsrf(token) {
  csrfToken = token;
}

async function parse(response) {
  let body = {};
  try {
    body = await response.json();
  } catch {
    body = { error: response.statusText };
  }
  if (!response.ok) throw new ApiError(response.status, body.error || response.statusText);
  return body;
}

export async function getJSON(path) {
  const response = await fetch(path, { headers: { accept: "application/json" } });
  return parse(response);
}

export async function postJSON(path, body) {
  const response = await fetch(path, {
    method: "POST",
    headers: { "content-type": "application/json", "x-legato-csrf": csrfToken },
    body: JSON.stringify(body),
  });
  return parse(response);
}

/**
 * Signs in: the link's `#token=` is taken off the address at once and traded
 * for a session cookie; without one, an existing session is used.
 */
export async function signIn() {
  const match = location.hash.match(/(?:^#|&)token=([^&]+)/);
  if (match) history.replaceState(history.state, "", location.pathname + location.search);
  if (match) {
    try {
      return await postJSON("/api/session", { token: decodeURIComponent(match[1]) });
    } catch (error) {
      if (!(error instanceof ApiError)) throw error;
    }
  }
  try {
    return await getJSON("/api/session");
  } catch (error) {
    if (error instanceof ApiError && error.status === 401) return null;
    throw error;
  }
}
