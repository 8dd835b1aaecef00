//! "Page cache" content: the guest's own files, read page by page.

use std::fs::{self, File};
use std::io::{self, Read};
use std::path::{Path, PathBuf};

/// Upper bound on files remembered from the walk, so pointing the corpus at
/// a large host tree costs bounded start-up time and memory.
const MAX_FILES: usize = 100_000;

/// Pseudo filesystems whose "files" are not page-cache content (and may block
/// or have side effects when read). Only skipped at the top level of `/`.
const SKIPPED_ROOT_DIRS: [&str; 3] = ["/proc", "/sys", "/dev"];

/// Hands out consecutive 4 KiB pages of the corpus files, cycling through the
/// files in sorted path order. Page `k` of a file is the bytes at offset
/// `k * 4096`, the final partial page zero-padded — the same layout the
/// kernel's page cache would have.
pub struct CorpusReader {
    files: Vec<PathBuf>,
    next_file: usize,
    /// The file being read; `None` between files.
    current: Option<File>,
    /// Set once a full pass over `files` produced no page at all.
    exhausted: bool,
}

impl CorpusReader {
    /// Walks `root` for non-empty regular files (symlinks are not followed).
    pub fn scan(root: &Path) -> CorpusReader {
        let mut files = Vec::new();
        collect_files(root, &mut files);
        CorpusReader::from_files(files)
    }

    pub fn from_files(files: Vec<PathBuf>) -> CorpusReader {
        let exhausted = files.is_empty();
        CorpusReader {
            files,
            next_file: 0,
            current: None,
            exhausted,
        }
    }

    pub fn file_count(&self) -> usize {
        self.files.len()
    }

    /// Copies the next file page into `page` (which must be zeroed by the
    /// caller or is zero-padded here). Returns `false` if no corpus file can
    /// be read, in which case the caller substitutes other content.
    pub fn next_page(&mut self, page: &mut [u8]) -> bool {
        // Each file is opened at most once per call, so a corpus of unreadable
        // files is detected after one pass instead of looping forever.
        let mut opens_left = self.files.len();
        while !self.exhausted {
            if let Some(file) = self.current.as_mut() {
                match read_full(file, page) {
                    Ok(0) | Err(_) => self.current = None,
                    Ok(read) => {
                        if read < page.len() {
                            // Final partial page: pad, and move on next time.
                            page[read..].fill(0);
                            self.current = None;
                        }
                        return true;
                    }
                }
            }
            if opens_left == 0 {
                self.exhausted = true;
                break;
            }
            opens_left -= 1;
            let path = &self.files[self.next_file];
            self.next_file = (self.next_file + 1) % self.files.len();
            self.current = File::open(path).ok();
        }
        false
    }
}

/// Reads until `buffer` is full or the file ends; returns the bytes read.
fn read_full(file: &mut File, buffer: &mut [u8]) -> io::Result<usize> {
    let mut filled = 0;
    while filled < buffer.len() {
        match file.read(&mut buffer[filled..]) {
            Ok(0) => break,
            Ok(read) => filled += read,
            Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
            Err(error) if filled == 0 => return Err(error),
            Err(_) => break,
        }
    }
    Ok(filled)
}

/// Depth-first walk in sorted name order, so the same tree always yields the
/// same page sequence for a given seed.
fn collect_files(dir: &Path, files: &mut Vec<PathBuf>) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    let mut paths: Vec<PathBuf> = entries
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .collect();
    paths.sort();
    for path in paths {
        if files.len() >= MAX_FILES {
            return;
        }
        let Ok(metadata) = fs::symlink_metadata(&path) else {
            continue;
        };
        if metadata.is_dir() {
            if !SKIPPED_ROOT_DIRS
                .iter()
                .any(|skipped| path == Path::new(skipped))
            {
                collect_files(&path, files);
            }
        } else if metadata.is_file() && metadata.len() > 0 {
            files.push(path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::PAGE_SIZE;

    struct TempDir(PathBuf);

    impl TempDir {
        fn new(name: &str) -> TempDir {
            let path =
                std::env::temp_dir().join(format!("ferry-guest-{name}-{}", std::process::id()));
            let _ = fs::remove_dir_all(&path);
            fs::create_dir_all(&path).expect("create temp dir");
            TempDir(path)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn pages_follow_file_offsets_with_zero_padding_and_cycle() {
        let dir = TempDir::new("corpus-layout");
        let long: Vec<u8> = (0..PAGE_SIZE + 100).map(|i| (i % 251) as u8 + 1).collect();
        fs::write(dir.0.join("a-long"), &long).unwrap();
        fs::write(dir.0.join("b-short"), b"hello").unwrap();
        fs::write(dir.0.join("c-empty"), b"").unwrap();
        fs::create_dir(dir.0.join("d-sub")).unwrap();
        fs::write(dir.0.join("d-sub").join("e-nested"), b"nested").unwrap();

        let mut reader = CorpusReader::scan(&dir.0);
        assert_eq!(reader.file_count(), 3, "empty files are skipped");
        let mut page = vec![0xEEu8; PAGE_SIZE];

        assert!(reader.next_page(&mut page));
        assert_eq!(&page[..], &long[..PAGE_SIZE]);

        assert!(reader.next_page(&mut page));
        assert_eq!(&page[..100], &long[PAGE_SIZE..]);
        assert!(page[100..].iter().all(|&b| b == 0));

        assert!(reader.next_page(&mut page));
        assert_eq!(&page[..5], b"hello");
        assert!(page[5..].iter().all(|&b| b == 0));

        assert!(reader.next_page(&mut page));
        assert_eq!(&page[..6], b"nested");

        assert!(
            reader.next_page(&mut page),
            "wraps around to the first file"
        );
        assert_eq!(&page[..], &long[..PAGE_SIZE]);
    }

    #[test]
    fn unreadable_corpus_reports_failure_instead_of_looping() {
        let mut reader =
            CorpusReader::from_files(vec![PathBuf::from("/nonexistent/ferry-guest-test")]);
        let mut page = vec![0u8; PAGE_SIZE];
        assert!(!reader.next_page(&mut page));
        assert!(!reader.next_page(&mut page));

        let mut empty = CorpusReader::scan(Path::new("/nonexistent/ferry-guest-test-dir"));
        assert_eq!(empty.file_count(), 0);
        assert!(!empty.next_page(&mut page));
    }
}
